"""Tests of the equivalence harness itself: it must pass what agrees and catch what does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmix.testing import assert_close, check_equivalent, default_tolerance


def test_identical_trees_pass():
    tree = {"y": jnp.arange(5.0), "state": (jnp.ones((2, 3)), jnp.zeros(4, jnp.int32))}
    errors = assert_close(tree, tree)
    assert all(e.passed and e.max_abs == 0 for e in errors)


def test_small_relative_error_passes_large_fails():
    ref = jnp.linspace(1.0, 2.0, 100)
    assert_close(ref, ref * (1 + 1e-6))
    with pytest.raises(AssertionError, match="relative RMS error"):
        assert_close(ref, ref * (1 + 1e-2))


def test_atol_passes_tiny_values():
    ref = jnp.full((10,), 1e-9)
    assert_close(ref, ref * 2, atol=1e-6)
    with pytest.raises(AssertionError):
        assert_close(ref, ref * 2, atol=1e-12, ratio=1e-3)


def test_message_names_worst_index_and_values():
    ref = jnp.zeros((3, 4))
    got = ref.at[2, 1].set(5.0).at[0, 0].set(1.0)
    with pytest.raises(AssertionError) as info:
        assert_close(ref + 1, got + 1, name="y")
    msg = str(info.value)
    assert "(2, 1)" in msg and "y" in msg and "max abs error 5.000e+00" in msg


def test_nan_in_result_always_fails():
    ref = jnp.ones(8)
    got = ref.at[3].set(jnp.nan)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(ref, got, atol=1e9, ratio=1e9)


def test_matching_nonfinite_positions_are_allowed():
    ref = jnp.array([1.0, jnp.inf, jnp.nan])
    assert_close(ref, ref)
    with pytest.raises(AssertionError):
        assert_close(ref, jnp.array([1.0, -jnp.inf, jnp.nan]))
    with pytest.raises(AssertionError, match="reference is non-finite"):
        assert_close(ref, jnp.array([1.0, 2.0, jnp.nan]), atol=1e9)


def test_shape_and_structure_mismatch():
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close(jnp.ones(3), jnp.ones(4))
    with pytest.raises(AssertionError, match="structure"):
        assert_close((jnp.ones(3),), [jnp.ones(3)])
    with pytest.raises(AssertionError, match="complex"):
        assert_close(jnp.ones(3), jnp.ones(3, jnp.complex64))


def test_integer_leaves_compare_exactly():
    a = jnp.array([1, 2, 3])
    assert_close(a, a)
    with pytest.raises(AssertionError):
        assert_close(a, a.at[0].set(2))


def test_default_tolerance_by_dtype(x64):
    assert default_tolerance(jnp.float64) < default_tolerance(jnp.float32)
    assert default_tolerance(jnp.complex128) == default_tolerance(jnp.float64)
    assert default_tolerance(jnp.float32) < default_tolerance(jnp.bfloat16)
    assert default_tolerance(jnp.int32) == (0.0, 0.0)
    # A float32 result against a float64 reference is judged by float32 tolerances.
    ref = jnp.linspace(0.0, 1.0, 50, dtype=jnp.float64)
    assert_close(ref, ref.astype(jnp.float32))


def _cumsum_loop(x, scale):
    out, acc = [], jnp.zeros_like(x[0])
    for t in range(x.shape[0]):
        acc = acc + scale * x[t]
        out.append(acc)
    return jnp.stack(out), acc


def _cumsum_fast(x, scale):
    y = jnp.cumsum(scale * x, axis=0)
    return y, y[-1]


def test_check_equivalent_passes_and_reports(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 3), jnp.float64)
    report = check_equivalent({"loop": _cumsum_loop, "fast": _cumsum_fast}, x, 2.0)
    text = str(report)
    assert "fast" in text and "grad" in text and report.reference == "loop"
    assert report.rows["fast"]["output"][0] < 1e-12


def test_check_equivalent_catches_wrong_gradient():
    x = jax.random.normal(jax.random.PRNGKey(1), (5,))

    def ref(x):
        return x**2

    def wrong_grad(x):
        # Same value, but half of the gradient is blocked.
        return x * jax.lax.stop_gradient(x)

    with pytest.raises(AssertionError, match=r"\[wrong\] grad"):
        check_equivalent({"ref": ref, "wrong": wrong_grad}, x)
    check_equivalent({"ref": ref, "wrong": wrong_grad}, x, grads=False)


def test_check_equivalent_catches_wrong_state_and_dtype():
    x = jnp.arange(6.0).reshape(3, 2)

    def bad_state(x, scale):
        y, s = _cumsum_fast(x, scale)
        return y, s + 1.0

    with pytest.raises(AssertionError, match="output"):
        check_equivalent({"ref": _cumsum_fast, "bad": bad_state}, x, 1.0, grads=False)
    with pytest.raises(AssertionError, match="dtype"):
        check_equivalent(
            {
                "ref": _cumsum_fast,
                "f16": lambda x, s: jax.tree.map(
                    lambda a: a.astype(jnp.float16), _cumsum_fast(x, s)
                ),
            },
            x,
            1.0,
            grads=False,
        )


def test_check_equivalent_complex_and_nested_args(x64):
    key = jax.random.PRNGKey(2)
    a = jax.random.normal(key, (4,)) + 1j * jax.random.normal(jax.random.fold_in(key, 1), (4,))
    params = {"a": a, "n": 3}

    def ref(p, x):
        return p["a"] ** p["n"] * x

    def fast(p, x):
        return p["a"] * p["a"] * p["a"] * x

    check_equivalent({"ref": ref, "fast": fast}, params, jnp.float64(1.5))
    with pytest.raises(AssertionError):
        check_equivalent({"ref": ref, "conj": lambda p, x: jnp.conj(fast(p, x))}, params, 1.5)


def test_check_equivalent_rejects_bad_usage():
    with pytest.raises(ValueError, match="at least two"):
        check_equivalent({"only": lambda x: x}, jnp.ones(2))
    with pytest.raises(ValueError, match="no floating-point"):
        check_equivalent({"a": lambda x: x, "b": lambda x: x}, jnp.arange(3))
    with pytest.raises(AssertionError, match="reference output"):
        check_equivalent({"a": lambda x: x / 0.0, "b": lambda x: x}, jnp.ones(2), grads=False)


def test_numpy_inputs_accepted():
    ref = np.linspace(0, 1, 10)
    assert_close(ref, ref + 1e-12)


def _batch_with_small_item(dtype=jnp.float32):
    """(4, 16, 8) values of order 1, except batch item 2, scaled by 1e-4."""
    ref = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 8), dtype)
    return ref.at[2].multiply(1e-4)


def test_small_magnitude_item_sign_flipped_fails():
    ref = _batch_with_small_item()
    got = ref.at[2].multiply(-1.0)
    # The whole-leaf relative RMS error is tiny: the old rule (max abs <= atol or whole-leaf
    # relative RMS < ratio) passed this.
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < default_tolerance(jnp.float32)[1]
    with pytest.raises(AssertionError, match=r"slice \[2, :, :\]"):
        assert_close(ref, got, atol=0)
    with pytest.raises(AssertionError, match=r"slice \[2, :, :\]"):
        assert_close(ref, got, atol=1e-6)
    # Each item is judged relative to its own size: 1e-6 relative error passes everywhere.
    assert_close(ref, ref * (1 + 1e-6), atol=0)


def test_small_magnitude_channel_and_time_step_are_checked():
    ref = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 8))
    small_channel = ref.at[..., 5].multiply(1e-4)
    with pytest.raises(AssertionError, match=r"slice \[:, :, 5\]"):
        assert_close(small_channel, small_channel.at[..., 5].multiply(1.5), atol=0)
    small_step = ref.at[:, 7].multiply(1e-4)
    with pytest.raises(AssertionError, match=r"slice \[:, 7, :\]"):
        assert_close(small_step, small_step.at[:, 7].set(0.0), atol=0)


def test_exact_means_exact():
    ref = jnp.linspace(1.0, 2.0, 12).reshape(3, 4)
    one_ulp = ref.at[1, 2].set(jnp.nextafter(ref[1, 2], jnp.inf))
    assert_close(ref, one_ulp)  # within the float32 tolerance
    with pytest.raises(AssertionError, match="exact equality was required"):
        assert_close(ref, one_ulp, exact=True)
    with pytest.raises(AssertionError, match="exact equality was required"):
        assert_close(ref, one_ulp, atol=0, ratio=0)
    assert_close(ref, ref + 0.0, exact=True)
    nan = ref.at[0, 0].set(jnp.nan)
    assert_close(nan, nan, exact=True)
    with pytest.raises(AssertionError, match="exact"):
        check_equivalent(
            {"a": lambda x: x * 3, "b": lambda x: x * 3 * (1 + 2.0**-22)}, one_ulp, exact=True
        )
    check_equivalent({"a": lambda x: x * 2, "b": lambda x: x + x}, one_ulp, exact=True)


def test_atol_zero_is_relative_not_exact():
    ref = jnp.linspace(1.0, 2.0, 12)
    assert_close(ref, ref * (1 + 1e-6), atol=0)
    with pytest.raises(AssertionError):
        assert_close(ref, ref * (1 + 1e-3), atol=0)


def test_one_bad_entry_in_a_large_leaf_fails():
    ref = jax.random.normal(jax.random.PRNGKey(5), (8, 64, 16))
    got = ref.at[3, 40, 2].add(0.05)
    # 0.05 in one of 8192 entries: a whole-leaf relative RMS error of about 5e-4 / sqrt(8)...
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 1e-3
    # ... but the (3, 40, :) row of 16 entries is off by 1.2e-2 relative.
    with pytest.raises(AssertionError, match=r"worst index \(3, 40, 2\)"):
        assert_close(ref, got)


def test_negative_tolerance_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        assert_close(jnp.ones(3), jnp.ones(3), atol=-1.0)


def test_report_has_the_worst_slice_error(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 3), jnp.float64)
    report = check_equivalent({"loop": _cumsum_loop, "fast": _cumsum_fast}, x, 2.0)
    max_abs, rel_rms, slice_rel = report.rows["fast"]["grad"]
    assert slice_rel >= rel_rms and "slice rel" in str(report)
