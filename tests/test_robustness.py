"""The robustness study runs end to end at toy sizes; its pieces do what they claim."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.robustness import __main__ as study_main
from experiments.robustness import noise, transfer


def test_tiny_study_end_to_end(tmp_path):
    study_main.main(["--tiny", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {
        "transfer.png",
        "transfer.json",
        "noise.json",
        "summary.md",
    }
    tf = json.loads((tmp_path / "transfer.json").read_text())
    assert tf["N"] == 16 and len(tf["spikes"]) == 3
    omega = np.asarray(tf["omega"])
    assert np.all(np.diff(omega) > 0)
    for name in transfer.SYSTEMS:
        assert len(tf["gain"][name]) == len(omega)
    # S4D's spikes stand far above PTD's error at the same frequency.
    for spike in tf["spikes"]:
        assert spike["error"] > 3 * spike["error_ptd"]
    result = json.loads((tmp_path / "noise.json").read_text())
    assert result["tiny"] and set(result["models"]) == set(noise.MODELS)
    for r in result["models"].values():
        assert 0 <= r["clean"] <= 1
        assert set(r["noisy"]) == {"0.1", "1.0"}
        assert set(r["noisy"]["0.1"]) == {"spike_1", "spike_2", "spike_3", "control"}
    summary = (tmp_path / "summary.md").read_text()
    assert "Tiny smoke run" in summary and "| S4-PTD |" in summary


def test_full_size_spikes_sit_at_s4d_resonances():
    """At N = 64 the highest S4D spike is at its fastest mode and PTD's error stays bounded."""
    study = transfer.transfer_study(64, n_grid=200, n_spikes=1)
    spike = study["spikes"][0]
    assert abs(spike["omega"] - 1303.27) < 0.01 and spike["error"] > 1000
    assert study["summary"]["ptd"]["max_error"] < 1.0


def test_find_spikes_and_quiet_frequency():
    omega = np.geomspace(1, 1000, 301)
    err = (
        0.01
        + np.exp(-(np.log(omega / 10) ** 2) * 50)
        + 3 * np.exp(-(np.log(omega / 300) ** 2) * 50)
    )
    spikes = transfer.find_spikes(omega, err, 3)
    assert len(spikes) == 2  # the flat floor has no peaks
    np.testing.assert_allclose([w for w, _ in spikes], [300, 10], rtol=0.02)
    quiet = transfer.quiet_frequency(omega, err, [w for w, _ in spikes])
    assert 10 < quiet < 300 and err[np.searchsorted(omega, quiet)] < 0.02


def test_task_has_the_codes_and_labels():
    cfg = noise.TaskConfig(length=20, n_classes=3, code_length=5, sigma=0.0)
    x, y = noise.make_task(cfg, 30, seed=1)
    assert x.shape == (30, 20, 1) and x.dtype == np.float32 and y.shape == (30,)
    assert np.all(np.abs(x[:, :5, 0]) == 1) and np.all(x[:, 5:] == 0)
    x2, y2 = noise.make_task(cfg, 30, seed=2)
    # One code per class, the same codebook for every seed.
    for c in range(3):
        codes = np.concatenate([x[y == c, :5, 0], x2[y2 == c, :5, 0]])
        assert len(codes) and np.all(codes == codes[0])


def test_fourier_noise_wrapper():
    layer = noise.make_layer("s4d", 4, 8, rngs=nnx.Rngs(0))
    wrapped = noise.FourierNoise(layer)
    x = jax.random.normal(jax.random.key(0), (2, 16, 4))
    np.testing.assert_array_equal(wrapped(x), layer(x))  # scale 0: off
    wrapped.omega[...] = jnp.asarray(3.0)
    wrapped.scale[...] = jnp.asarray(0.1)
    dt = jnp.exp(layer.log_dt[...])
    amp = 0.1 * jax.random.uniform(jax.random.wrap_key_data(wrapped.key[...]), (2, 1, 1))
    expected = layer(x + amp * jnp.cos(3.0 * dt * jnp.arange(16)[:, None]))
    np.testing.assert_allclose(wrapped(x), expected, rtol=1e-6, atol=1e-6)


def test_exact_b_variant_removes_the_clip():
    clipped = noise.make_layer("s4d", 2, 64, rngs=nnx.Rngs(0))
    exact = noise.make_layer("s4d_exact_b", 2, 64, rngs=nnx.Rngs(0))
    assert float(jnp.max(jnp.abs(clipped.B[...][..., 1]))) <= 2.0 + 1e-6
    assert float(jnp.max(jnp.abs(exact.B[...]))) > 10
