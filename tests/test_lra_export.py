"""LRA evaluation restores only the model; export / load_exported round-trips a trained model
bit for bit; the evaluate and export CLIs fail with one line; the generators report progress.

One tiny real S4D run (1 layer, d_model 8, 4 states, 6 steps) is trained once for the module.
"""

import json
import shutil
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from experiments.lra import evaluate as lra_evaluate
from experiments.lra import export as lra_export
from experiments.lra import train as lra_train
from experiments.lra.configs import Config, make_config
from experiments.lra.data import eval_batches
from experiments.lra.listops import main as listops_main
from experiments.lra.listops import write_listops
from experiments.lra.pathfinder import write_pathfinder
from tests.conftest import persistent_compilation_cache

S4D = {"d_state": 4, "bidirectional": False, "init": "legs", "mode": "fft"}


@pytest.fixture(scope="module", autouse=True)
def shared_compilations(tmp_path_factory):
    """A persistent compilation cache for the module: every Experiment of the run's config
    (training, full restore, evaluation) compiles the same evaluation step, so all but the
    first load it instead of compiling it again."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run: 24 examples in batches of 4, validation (and a checkpoint) at steps
    3 and 6, and a metrics-free checkpoint at step 4."""
    root = tmp_path_factory.mktemp("export")
    data = write_listops(root / "data", n_train=24, n_val=8, n_test=8, seed=5, min_length=6,
                         max_length=30)  # fmt: skip
    cfg = make_config("listops", "s4d", "demo", dict(
        data_dir=str(data), out_dir=str(root / "runs"), mixer=S4D, d_model=8, n_layers=1,
        batch_size=4, max_len=32, pad_multiple=32, eval_limit=0, lr=0.01, ssm_lr=0.005,
        warmup_ratio=0.2, epochs=1, log_every=3, eval_every=3, ckpt_every=4, progress=False,
        dropout=0.1,
    ))  # fmt: skip
    assert lra_train.train(cfg)["status"] == "done"
    return lra_train.run_dir(cfg), cfg


@pytest.fixture(scope="module")
def full_restore(run):
    """The run's Experiment with checkpoint 3 restored whole (optimiser state included), and
    its validation and test metrics."""
    path, cfg = run
    exp = lra_train.Experiment(cfg, lra_train.load_data(cfg))
    mgr = lra_train.checkpoint_manager(path / "checkpoints", cfg.keep_checkpoints, create=False)
    try:
        lra_train.restore_checkpoint(mgr, exp, 3)
    finally:
        mgr.close()
    return exp, {split: exp.evaluate(split) for split in ("val", "test")}


def test_evaluate_reads_only_the_model(run, full_restore, tmp_path):
    path, _ = run
    _, expected = full_restore
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["3", "4", "6"]
    results = lra_evaluate.evaluate_checkpoint(path, step=3)
    assert results == {"step": 3, **expected}
    # The optimiser changed since training (gradient clipping added): the whole training
    # state no longer restores, the model alone still does and evaluates the same.
    changed = tmp_path / "changed"
    shutil.copytree(path, changed)
    saved = json.loads((changed / "config.json").read_text())
    assert saved["grad_clip"] == 0.0
    saved["grad_clip"] = 1.0
    (changed / "config.json").write_text(json.dumps(saved))
    cfg = Config.from_dict(saved)
    exp = lra_train.Experiment(cfg, lra_train.load_data(cfg))
    mgr = lra_train.checkpoint_manager(changed / "checkpoints", 3, create=False)
    try:
        with pytest.raises(lra_train.CheckpointError, match="step 3 .* does not match"):
            lra_train.restore_checkpoint(mgr, exp, 3)
    finally:
        mgr.close()
    assert lra_evaluate.restore_for_evaluation(exp, changed / "checkpoints", 3) == 3
    assert {s: lra_evaluate.evaluate_split(exp, s) for s in ("val", "test")} == expected
    # The optimiser state is the fresh one, not the checkpoint's.
    fresh = lra_train.Experiment(cfg, exp.data).state["opt"]
    for a, b in zip(jax.tree.leaves(exp.state["opt"]), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_loads_back_bit_identical(run, full_restore, tmp_path, capsys):
    path, cfg = run
    exp, _ = full_restore
    out = tmp_path / "model.npz"
    assert lra_export.main([str(path / "checkpoints" / "3"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: listops / s4d (demo), step 3 of {path},")
    model, loaded_cfg = lra_export.load_exported(out)
    assert loaded_cfg == cfg
    # Every variable equals the checkpoint's, bit for bit, and differs from a fresh model.
    ours = lra_export.model_variables(model)
    fresh = lra_export.model_variables(
        lra_export.build_model(cfg, lra_export.read_export(out).info)
    )
    assert jax.tree.structure(ours["params"]) == jax.tree.structure(exp.state["params"])
    for key in ("params", "rest"):
        for a, b in zip(jax.tree.leaves(ours[key]), jax.tree.leaves(exp.state[key]), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(fresh), strict=True)
    ]
    assert all(changed[:6]), "the S4D parameters trained away from their initial values"
    # The loaded model (eval mode) computes exactly what the run's evaluation model does.
    run_model = nnx.merge(exp.graph_eval, exp.state["params"], exp.state["rest"])
    batch = next(eval_batches(exp.data, exp.data.test, 8, pad_multiple=cfg.pad_multiple))
    forward = nnx.jit(lambda m, x, mask: m(x, mask))
    x, mask = jnp.asarray(batch["x"]), jnp.asarray(batch["mask"])
    expected = np.asarray(forward(run_model, x, mask))
    np.testing.assert_array_equal(np.asarray(forward(model, x, mask)), expected)
    # The TaskInfo export derives from the config matches what the loader produced.
    info = lra_export.TaskInfo.for_config(cfg)
    assert (info.n_classes, info.vocab_size, info.kind, info.paired) == (
        exp.data.n_classes, exp.data.vocab_size, exp.data.kind, exp.data.paired
    )  # fmt: skip


def test_export_file_keeps_any_dtype_exactly(run, tmp_path):
    _, cfg = run
    rng = np.random.default_rng(0)
    values = {
        "z": (rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2))).astype(np.complex64),
        "h": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
        "i": np.arange(4, dtype=np.int32),
    }
    variables = {
        "params": nnx.State({"layer": {0: {"z": values["z"], "h": values["h"]}}}),
        "rest": nnx.State({"count": values["i"]}),
    }
    info = lra_export.TaskInfo.for_config(cfg)
    path = lra_export.write_export(tmp_path / "x.npz", cfg=cfg, info=info, variables=variables)
    back = lra_export.read_export(path)
    assert back.info == info and back.cfg == cfg and back.step is None
    got = {**back.variables["params"], **back.variables["rest"]}
    assert sorted(got, key=str) == sorted(
        [("layer", 0, "z"), ("layer", 0, "h"), ("count",)], key=str
    )
    for key, name in ((("layer", 0, "z"), "z"), (("layer", 0, "h"), "h"), (("count",), "i")):
        assert got[key].dtype == values[name].dtype
        assert got[key].tobytes() == values[name].tobytes()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_clear_one_line_errors(run, tmp_path, capsys):
    path, cfg = run
    out = tmp_path / "m.npz"
    # Not a run directory.
    assert lra_export.main([str(tmp_path), "--out", str(out)]) == 1
    assert "error: " + str(tmp_path) + " is neither a run directory" in _error_line(capsys)
    assert lra_evaluate.main([str(tmp_path / "nowhere")]) == 1
    assert _error_line(capsys).endswith(f"error: {tmp_path / 'nowhere'} does not exist")
    # A step that does not exist: the available ones are listed.
    for main in (lra_export.main, lra_evaluate.main):
        args = [str(path), "--step", "5"] + (["--out", str(out)] if main is lra_export.main else [])
        assert main(args) == 1
        assert _error_line(capsys).endswith(
            f"error: no checkpoint for step 5 in {path / 'checkpoints'}; available: [3, 4, 6]"
        )
    with pytest.raises(ValueError, match="step must be 'best', 'latest' or a step number"):
        lra_export.export_run(path, out, step="first")
    assert not out.exists()
    # Damaged export files.
    assert lra_export.main([str(path), "--step", "latest", "--out", str(out)]) == 0
    capsys.readouterr()
    data = out.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated.npz is not a readable ssmix model export: "
                       r"it is not a .npz \(zip\) archive"):  # fmt: skip
        lra_export.load_exported(truncated)
    assert lra_export.main(["--inspect", str(truncated)]) == 1
    assert "is not a readable ssmix model export" in _error_line(capsys)
    # One flipped bit inside an array: the archive's checksum catches it.
    with zipfile.ZipFile(out) as archive:
        info = archive.getinfo("v0.npy")
    flipped = bytearray(data)
    flipped[info.header_offset + 30 + len(info.filename) + info.file_size - 1] ^= 1
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"damaged.npz is not a readable ssmix model export "
                       r"\(BadZipFile: Bad CRC-32"):  # fmt: skip
        lra_export.read_export(damaged)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz is not a readable ssmix model export: it "
                       "has no ssmix_export member"):  # fmt: skip
        lra_export.read_export(other)
    with pytest.raises(FileNotFoundError, match="no export file at"):
        lra_export.read_export(tmp_path / "missing.npz")


def test_generators_report_progress(tmp_path, capsys):
    write_listops(tmp_path / "lo", n_train=3, n_val=1, n_test=1, seed=1, min_length=4,
                  max_length=30, progress=True)  # fmt: skip
    assert "ListOps: 100%" in capsys.readouterr().err
    write_pathfinder(tmp_path / "pf", n_samples=1, resolution=32, progress=True)
    assert "Pathfinder 32x32: 100%" in capsys.readouterr().err
    # The CLI's log lines reach stderr (orbax's handler on the root logger does not mute them).
    listops_main(["--out", str(tmp_path / "cli"), "--n-train", "2", "--n-val", "1", "--n-test",
                  "1", "--min-length", "4", "--max-length", "30", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert "generating 4 ListOps samples (4 < length < 30)" in err
    assert f"wrote 4 ListOps samples to {tmp_path / 'cli'}" in err
    assert "ListOps:" not in err
