"""LRA training loop: CLIs, a short run learning, exact resume after an interrupt, the same
step on 4 devices as on 1, configs for every task × model, every model taking a step."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments.lra.models as lra_models
from experiments.lra import evaluate as lra_evaluate
from experiments.lra import train as lra_train
from experiments.lra.configs import MODELS, TASKS, make_config
from experiments.lra.data import Ragged, Split, TaskData
from experiments.lra.listops import write_listops
from ssmix.layers.base import SSMParam

REPO = Path(__file__).resolve().parents[1]


class CausalMeanMixer(nnx.Module):
    """A tiny mask-respecting mixer standing in for the real layers in loop tests."""

    def __init__(self, d_model, *, rngs):
        self.log_scale = SSMParam(jnp.zeros(d_model))
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x, mask=None):
        m = jnp.ones(x.shape[:2] + (1,), x.dtype) if mask is None else mask[..., None]
        csum = jnp.cumsum(x * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
        return self.proj(csum) * jnp.exp(self.log_scale[...])


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops")
    return write_listops(root, n_train=320, n_val=48, n_test=48, seed=3, min_length=8,
                         max_length=60)  # fmt: skip


@pytest.fixture
def toy_mixer(monkeypatch):
    monkeypatch.setattr(lra_models, "mixer_class", lambda model: CausalMeanMixer)


def _toy_overrides(data_dir, out_dir, **extra):
    values = dict(
        data_dir=str(data_dir), out_dir=str(out_dir), mixer={}, d_model=16, n_layers=2,
        batch_size=16, max_len=64, pad_multiple=64, eval_limit=0, lr=0.01, ssm_lr=0.01,
        warmup_ratio=0.1, log_every=5, eval_every=10, ckpt_every=10, progress=False,
        dropout=0.1,
    )  # fmt: skip
    values.update(extra)
    return values


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in lra_train.TIMING_KEYS} for r in rows]


def test_cli_run_learns_and_evaluates(listops_dir, tmp_path, toy_mixer, capsys):
    args = ["--task", "listops", "--model", "s4d", "--preset", "demo"]
    overrides = _toy_overrides(listops_dir, tmp_path, epochs=4, eval_every=20, ckpt_every=40)
    sets = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in overrides.items()]
    assert lra_train.main(args + sum((["--set", s] for s in sets), [])) == 0
    run = tmp_path / "listops-s4d-demo"
    printed = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert printed.splitlines()[-1] == lra_train.format_summary("listops-s4d-demo", summary)
    rows = lra_train.read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 80 // 5
    first, last = np.mean([r["loss"] for r in train_rows[:2]]), train_rows[-1]["loss"]
    assert last < first - 0.1, (first, last)
    assert [r["step"] for r in rows if r["split"] == "val"] == [20, 40, 60, 80]
    assert (run / "curves.png").stat().st_size > 0
    assert (run / "checkpoints" / "80").is_dir()
    # The evaluate CLI restores the final checkpoint (given as a step folder) and reproduces
    # the validation and test metrics written at the end of training.
    assert lra_evaluate.main(["--checkpoint", str(run / "checkpoints" / "80")]) == 0
    printed = capsys.readouterr().out
    for split in ("val", "test"):
        row = [r for r in rows if r["split"] == split and r["step"] == 80][-1]
        assert f"step 80 {split}: accuracy {row['accuracy']:.4f}, loss {row['loss']:.4f}" in printed
        assert summary["final"][split]["accuracy"] == row["accuracy"]
    # An existing run is never silently overwritten: one error line, exit status 1.
    assert lra_train.main(args + sum((["--set", s] for s in sets), [])) == 1
    assert (run / "checkpoints" / "80").is_dir()
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        lra_evaluate.locate(tmp_path)


def test_resume_reproduces_uninterrupted_run(listops_dir, tmp_path, toy_mixer):
    """Interrupted by SIGINT at step 23 (between log, eval and checkpoint steps, in the
    second epoch) and resumed, the run writes exactly the metrics of an uninterrupted run."""
    base = _toy_overrides(listops_dir, tmp_path, epochs=2, ckpt_every=100, eval_every=15)
    full = lra_train.train(make_config("listops", "s4d", "demo", {**base, "run_name": "a"}))
    cfg = make_config("listops", "s4d", "demo", {**base, "run_name": "b"})

    def interrupt(step):
        if step == 23:
            os.kill(os.getpid(), signal.SIGINT)

    part = lra_train.train(cfg, on_step=interrupt)
    assert part["status"] == "interrupted" and part["step"] == 23
    assert (tmp_path / "b" / "checkpoints" / "23").is_dir()
    resumed = lra_train.train(cfg, resume=True)
    assert resumed["status"] == "done" and resumed["step"] == full["step"] == 40
    rows_a = _comparable(lra_train.read_metrics(tmp_path / "a" / "metrics.jsonl"))
    rows_b = _comparable(lra_train.read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert rows_a == rows_b
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    changed = make_config("listops", "s4d", "demo", {**base, "run_name": "b", "lr": 0.5})
    with pytest.raises(ValueError, match="changed: lr"):
        lra_train.train(changed, resume=True)


_FOUR_DEVICE_SCRIPT = """
import json, sys
import numpy as np, jax
sys.path.insert(0, {tests!r})
import importlib.util
spec = importlib.util.spec_from_file_location("t", {test_file!r})
t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
import experiments.lra.models as lra_models
lra_models.mixer_class = lambda model: t.CausalMeanMixer
from experiments.lra import train as lra_train
from experiments.lra.configs import make_config
cfg = make_config("listops", "s4d", "demo", json.loads({overrides!r}))
exp = lra_train.Experiment(cfg, lra_train.load_data(cfg))
assert len(exp.devices) == jax.device_count(), exp.devices
for step in range(3):
    exp.train_step(step)
batch = exp.device_batch(exp.train_batch(0))
leaves = jax.tree.leaves(jax.device_get(exp.state["params"]))
np.savez({out!r}, *leaves, n_shards=len(batch["x"].addressable_shards))
"""


def test_four_devices_match_one(listops_dir, tmp_path, toy_mixer):
    overrides = _toy_overrides(listops_dir, tmp_path, norm="batch", dropout=0.2)
    script = _FOUR_DEVICE_SCRIPT.format(
        tests=str(REPO / "tests"), test_file=__file__, overrides=json.dumps(overrides),
        out=str(tmp_path / "four.npz"),
    )  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(REPO))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = np.load(tmp_path / "four.npz")
    assert int(four["n_shards"]) == 4

    cfg = make_config("listops", "s4d", "demo", overrides)
    exp = lra_train.Experiment(cfg, lra_train.load_data(cfg), devices=jax.devices()[:1])
    for step in range(3):
        exp.train_step(step)
    leaves = jax.tree.leaves(jax.device_get(exp.state["params"]))
    assert len(leaves) == len(four.files) - 1
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(four[f"arr_{i}"], leaf, rtol=2e-5, atol=2e-6)


def test_configs_for_every_task_and_model():
    for task in TASKS:
        for model in MODELS:
            for preset in ("published", "demo"):
                cfg = make_config(task, model, preset)
                assert cfg.task == task and cfg.model == model
    s4 = make_config("listops", "s4", "s4-2023")
    assert (s4.n_layers, s4.d_model, s4.mixer["d_state"], s4.prenorm, s4.lr, s4.weight_decay,
            s4.batch_size, s4.epochs, s4.norm, s4.ssm_lr) == (
        6, 256, 4, False, 0.01, 0.05, 32, 40, "batch", 1e-3)  # fmt: skip
    assert s4.mixer["bidirectional"] is True
    s5 = make_config("pathx", "s5")
    assert (s5.n_layers, s5.d_model, s5.mixer["d_state"], s5.mixer["blocks"], s5.batch_size,
            s5.epochs, s5.weight_decay, s5.mixer["dt_min"]) == (
        6, 128, 256, 16, 32, 75, 0.06, 1e-4)  # fmt: skip
    assert s5.lr == pytest.approx(1.8e-3) and s5.ssm_lr == 6e-4
    assert make_config("image", "s4d").dropout == 0.1
    assert make_config("pathx", "s4-ptd").mixer["init"] == "ptd"
    assert make_config("text", "s5-ptd").mixer["init"] == "ptd"
    assert make_config("text", "attention").positional == "sinusoidal"
    cfg = make_config("listops", "s4d", overrides=["prenorm=yes", "mixer.d_state=8",
                                                   "mixer.init=null", "lr=3e-4"])  # fmt: skip
    assert cfg.prenorm is True and cfg.mixer["d_state"] == 8 and "init" not in cfg.mixer
    assert cfg.lr == 3e-4
    with pytest.raises(ValueError, match="unknown config key 'lrate'"):
        make_config("listops", "s4d", overrides=["lrate=1"])
    with pytest.raises(ValueError, match="expected a boolean"):
        make_config("listops", "s4d", overrides=["prenorm=maybe"])
    with pytest.raises(ValueError, match="key=value"):
        make_config("listops", "s4d", overrides=["prenorm"])
    with pytest.raises(ValueError, match="model must be one of"):
        make_config("listops", "s6")


def _synthetic(kind, paired=False, n=8, length=24):
    rng = np.random.default_rng(0)
    high = 256 if kind == "pixels" else 17
    seqs = [rng.integers(1, high, rng.integers(length // 2, length + 1)) for _ in range(n)]
    split = Split(
        Ragged.from_lists(seqs), rng.integers(0, 2, n).astype(np.int32),
        Ragged.from_lists(seqs[::-1]) if paired else None,
    )  # fmt: skip
    return TaskData("t", split, split, split, 2, kind, max_len=length,
                    vocab_size=17 if kind == "tokens" else None, paired=paired)  # fmt: skip


def _tiny(cfg_model, task):
    cfg = make_config(task, cfg_model, "demo")
    mixer = dict(cfg.mixer)
    for key, small in (("d_state", 4), ("blocks", 2), ("num_heads", 2)):
        if key in mixer:
            mixer[key] = small
    if cfg_model == "hydra":  # Hydra keeps its own defaults in the configs; shrink them here
        mixer.update(d_state=4, headdim=4, chunk_size=8)
    return make_config(task, cfg_model, "demo", {
        "d_model": 8, "n_layers": 1, "batch_size": 4, "max_len": 24, "pad_multiple": 24,
        "mixer": mixer, "progress": False,
    })  # fmt: skip


@pytest.mark.parametrize("model", MODELS)
def test_every_model_takes_a_training_step(model):
    """Each configured model (tiny sizes) builds and trains on ListOps-like tokens (every
    layer exists: a missing one is a failure, not a skip)."""
    lra_models.mixer_class(model)
    _step_and_check(_tiny(model, "listops"), _synthetic("tokens"))


def test_experiment_takes_the_presets_optimizer_and_pixel_scaling(toy_mixer, tmp_path):
    """The loop's optimiser is the config's (models.build_optimizer): warmup counted in steps
    as the S4 anchors give it, the anchor's groups (the optimiser state has the structure
    build_optimizer gives), and the config's pixel_norm reaches the loaded data."""
    tiny = {"d_model": 8, "n_layers": 1, "batch_size": 4, "max_len": 24, "pad_multiple": 24,
            "mixer": {}, "progress": False, "max_steps": 40}  # fmt: skip
    cfg = make_config("listops", "s4d", "published", {**tiny, "warmup_steps": 7})
    assert cfg.no_decay and cfg.warmup_steps == 7 and cfg.warmup_ratio == 0
    exp = lra_train.Experiment(cfg, _synthetic("tokens"))
    assert exp.warmup_steps == 7
    assert float(exp.lr_schedule(0)) == 0.0
    np.testing.assert_allclose(float(exp.lr_schedule(7)), cfg.lr, rtol=1e-6)
    model = lra_models.build_model(cfg, _synthetic("tokens"), rngs=nnx.Rngs(cfg.seed))
    tx, _, warmup = lra_models.build_optimizer(cfg, model, steps_per_epoch=2, total_steps=40)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    assert warmup == 7
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(exp.state["opt"])
    # Pixel scaling: the 2023 configs' Pathfinder is [0, 1] (center: False), the V3 default
    # [-1, 1]; load_data carries the config's choice into the batches.
    from experiments.lra.pathfinder import write_pathfinder

    root = write_pathfinder(tmp_path / "pf", n_samples=10, resolution=32, per_folder=5)
    for preset, norm in (("published", (0.5, 0.5)), ("s4-2023", (0.0, 1.0))):
        pcfg = make_config("pathfinder", "s4d", preset, {"data_dir": str(root)})
        assert pcfg.pixel_norm == ([] if preset == "published" else [0.0, 1.0])
        data = lra_train.load_data(pcfg)
        assert data.pixel_scaling == norm, preset


@pytest.mark.parametrize("task, kind, paired", [("image", "pixels", False),
                                                ("retrieval", "tokens", True)])  # fmt: skip
def test_pixel_and_paired_inputs_train(task, kind, paired, toy_mixer):
    tiny = {"d_model": 8, "n_layers": 1, "batch_size": 4, "max_len": 24, "pad_multiple": 24}
    cfg = make_config(task, "s4d", "demo", {**tiny, "mixer": {}})
    _step_and_check(cfg, _synthetic(kind, paired))


def _step_and_check(cfg, data):
    exp = lra_train.Experiment(cfg, data)
    before = jax.tree.leaves(jax.device_get(exp.state["params"]))
    exp.train_step(0)
    exp.train_step(1)
    after = jax.tree.leaves(jax.device_get(exp.state["params"]))
    window = exp.take_window()
    assert np.isfinite(window["loss"]) and window["tokens"] > 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
