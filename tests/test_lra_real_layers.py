"""The LRA loop with the real layers: a tiny S4D and a tiny S5 model (complex ``SSMParam``s)
through :func:`experiments.lra.train.train`, interrupted and resumed bit-identically, and the
same training steps on 4 (fake CPU) devices as on 1.

tests/test_lra_train.py checks the loop itself with a toy mixer; this module checks that the
real layers' parameters (complex modes, per-group learning rates, the S4D kernel's and S5's
discretisation) survive a checkpoint round trip and sharding unchanged.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments.lra import train as lra_train
from experiments.lra.configs import make_config
from experiments.lra.listops import write_listops
from ssmix.testing import assert_close
from tests.conftest import persistent_compilation_cache

REPO = Path(__file__).resolve().parents[1]

# Tiny mixers: the demo presets' options with few states (S5: 2 blocks of 2 complex modes),
# causal (one scan direction) to keep the compilations short.
MIXERS = {
    "s4d": {"d_state": 4, "bidirectional": False, "init": "legs", "mode": "fft"},
    "s5": {"d_state": 4, "blocks": 2, "bidirectional": False, "conj_sym": True,
           "C_init": "lecun_normal"},
}  # fmt: skip


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops_real")
    return write_listops(root, n_train=24, n_val=8, n_test=8, seed=5, min_length=6,
                         max_length=30)  # fmt: skip


@pytest.fixture
def shared_compilations(tmp_path):
    """A persistent compilation cache for the test: the three 1-device runs of a model
    compile the same train and eval steps (only the run name differs), so the second and
    third runs load the first's executables instead of compiling again (~2/3 of the time)."""
    with persistent_compilation_cache(tmp_path / "xla_cache"):
        yield


def _overrides(data_dir, out_dir, model, **extra):
    """24 examples in batches of 4: 6 steps per epoch, 12 in all."""
    values = dict(
        data_dir=str(data_dir), out_dir=str(out_dir), mixer=dict(MIXERS[model]), d_model=8,
        n_layers=1, batch_size=4, max_len=32, pad_multiple=32, eval_limit=0, lr=0.01,
        ssm_lr=0.005, warmup_ratio=0.2, epochs=2, log_every=2, eval_every=6, ckpt_every=4,
        progress=False, dropout=0.1,
    )  # fmt: skip
    values.update(extra)
    return values


def _final_params(cfg, step: int):
    """The parameters stored in the run's checkpoint of ``step``."""
    out = lra_train.run_dir(cfg)
    mgr = lra_train.checkpoint_manager(out / "checkpoints", cfg.keep_checkpoints, create=False)
    try:
        exp = lra_train.Experiment(cfg, lra_train.load_data(cfg))
        lra_train.restore_checkpoint(mgr, exp, step)
        return jax.device_get(exp.state["params"])
    finally:
        mgr.close()


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in lra_train.TIMING_KEYS} for r in rows]


class _Interrupt:
    """``on_step`` hook: a KeyboardInterrupt after step ``at`` (as Ctrl-C during the step)."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


_FOUR_DEVICES = """
import json, sys
import jax
from experiments.lra import train as lra_train
from experiments.lra.configs import make_config
assert jax.device_count() == 4, jax.devices()
cfg = make_config("listops", {model!r}, "demo", json.loads({overrides!r}))
summary = lra_train.train(cfg)
assert summary["status"] == "done", summary
"""


def _start_four_device_run(model: str, overrides: dict) -> subprocess.Popen:
    """The same run on 4 fake CPU devices, in a subprocess (the device count is fixed when
    jax starts); it runs while this process trains on 1 device."""
    script = _FOUR_DEVICES.format(model=model, overrides=json.dumps(overrides))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(REPO))  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.parametrize("model", ["s4d", "s5"])
def test_real_layer_resume_bit_identical_and_four_devices_match_one(
    listops_dir, tmp_path, model, shared_compilations
):
    # Batch norm: its statistics are state to checkpoint and to reduce across devices.
    base = _overrides(listops_dir, tmp_path, model, norm="batch")
    four = _start_four_device_run(model, {**base, "run_name": "four"})
    try:
        full_cfg = make_config("listops", model, "demo", {**base, "run_name": "full"})
        full = lra_train.train(full_cfg)
        assert jax.device_count() == 1  # this process: one CPU device
        cfg = make_config("listops", model, "demo", {**base, "run_name": "cut"})
        # Step 7: in the second epoch, after the checkpoint of step 4 and the evaluation of
        # step 6, before the checkpoint of step 8.
        part = lra_train.train(cfg, on_step=_Interrupt(7))
        assert part["status"] == "interrupted" and part["step"] == 7
        resumed = lra_train.train(cfg, resume=True)
        _, stderr = four.communicate(timeout=600)
    finally:
        four.kill()
    assert resumed["status"] == "done" and resumed["step"] == full["step"] == 12

    # Interrupted and resumed: the metrics and the final parameters are bit-identical.
    rows_full = _comparable(lra_train.read_metrics(tmp_path / "full" / "metrics.jsonl"))
    rows_cut = _comparable(lra_train.read_metrics(tmp_path / "cut" / "metrics.jsonl"))
    assert [r["step"] for r in rows_full if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert rows_cut == rows_full
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    params_full = _final_params(full_cfg, 12)
    assert_close(params_full, _final_params(cfg, 12), exact=True, check_dtype=True)
    # The real layer's parameters are among them (S5's modes and projections are complex).
    # (The complex modes and projections are kept as real and imaginary parts.)
    mixer = params_full["blocks"][0]["mixer"]
    assert set(mixer) >= (
        {"Lambda_re", "Lambda_im", "B", "C"} if model == "s5" else {"A_re_log", "A_im"}
    )

    # On 4 devices: the same run up to float32 rounding. Not bit-identical: the batch
    # reductions (loss, gradients, batch-norm statistics) are summed across the devices in
    # another order. After 12 Adam steps of lr ≤ 0.01 that moves the parameters by ~1e-6
    # relative; a device-dependent bug (a shard dropped or counted twice, a statistic not
    # reduced across devices) moves them by ~lr.
    assert four.returncode == 0, stderr[-3000:]
    four_cfg = make_config("listops", model, "demo", {**base, "run_name": "four"})
    assert_close(params_full, _final_params(four_cfg, 12), ratio=1e-4, atol=1e-6, name=model)
    rows_four = _comparable(lra_train.read_metrics(tmp_path / "four" / "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in rows_four] == [
        (r["step"], r["split"]) for r in rows_full
    ]
    for a, b in zip(rows_full, rows_four, strict=True):
        if a.get("loss") is not None:
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
