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
