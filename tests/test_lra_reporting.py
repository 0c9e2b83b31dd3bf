"""LRA reporting and run safety: the best-validation checkpoint kept and reported (test at
the best validation step), `evaluate` reproducing it, the `results` table; run directories
recognised by their marker, corrupted checkpoints, non-finite losses, atomic writes and
half-written metrics, failed starts leaving nothing behind."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments.lra.models as lra_models
from experiments.logs import setup_logging
from experiments.lra import evaluate as lra_evaluate
from experiments.lra import results as lra_results
from experiments.lra import train as lra_train
from experiments.lra.configs import make_config
from experiments.lra.listops import write_listops
from tests.test_lra_train import CausalMeanMixer, _toy_overrides

PEAK = 6  # the first evaluation step (once per epoch: 96 examples / batch 16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops")
    return write_listops(root, n_train=96, n_val=32, n_test=32, seed=5, min_length=8,
                         max_length=40)  # fmt: skip


def _cfg(data_dir, out_dir, **extra):
    tiny = dict(d_model=8, n_layers=1, max_len=48, pad_multiple=48, max_steps=40)
    values = _toy_overrides(data_dir, out_dir, **{**tiny, **extra})
    return make_config("listops", "s4d", "demo", values)


@pytest.fixture
def cli_logging():
    """The package loggers' stderr handler (``experiments.logs.setup_logging``, which every
    CLI main installs and which stops propagation to the root logger): log lines are read
    with ``capsys``, whichever test ran first."""
    setup_logging()


@pytest.fixture
def toy_mixer(monkeypatch):
    monkeypatch.setattr(lra_models, "mixer_class", lambda model: CausalMeanMixer)


def _rarest_class(data_dir):
    labels = []
    for split in ("val", "test"):
        lines = (data_dir / f"basic_{split}.tsv").read_text().splitlines()[1:]
        labels += [int(line.split("\t")[-1]) for line in lines]
    return int(np.argmin(np.bincount(labels, minlength=10)))


@pytest.fixture(scope="module")
def peak_run(data_dir, tmp_path_factory):
    """A run whose validation accuracy peaks at step PEAK: after it, every step ends by
    setting the classifier head to always predict the rarest class of val and test (a real
    state, checkpointed as such). Validation once per epoch (eval_every=0), no periodic
    checkpoints, and no train log window but the last one."""
    out = tmp_path_factory.mktemp("runs")
    cfg = _cfg(data_dir, out, run_name="peak", eval_every=0, ckpt_every=1000, log_every=100,
               keep_checkpoints=2)  # fmt: skip
    rare = _rarest_class(data_dir)
    real_step = lra_train.Experiment.train_step

    def train_step(self, step=None):
        real_step(self, step)
        if int(self.state["step"]) > PEAK:

            def wreck(path, leaf):
                names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
                if "head" not in names:
                    return leaf
                if leaf.ndim == 1:
                    return jnp.full_like(leaf, -10.0).at[rare].set(10.0)
                return jnp.zeros_like(leaf)

            params = jax.tree_util.tree_map_with_path(wreck, self.state["params"])
            self.state = {**self.state, "params": params}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lra_models, "mixer_class", lambda model: CausalMeanMixer)
        mp.setattr(lra_train.Experiment, "train_step", train_step)
        summary = lra_train.train(cfg)
    return cfg, summary, out / "peak"


def test_best_validation_step_is_kept_reported_and_reproduced(peak_run, toy_mixer, capsys):
    cfg, summary, run = peak_run
    rows = lra_train.read_metrics(run / "metrics.jsonl")
    val = {r["step"]: r for r in rows if r["split"] == "val"}
    assert sorted(val) == [6, 12, 18, 24, 30, 36, 40]  # once per epoch, and the last step
    assert [r["step"] for r in rows if r["split"] == "train"] == [40]
    assert val[PEAK]["accuracy"] > max(val[s]["accuracy"] for s in val if s != PEAK)
    # The summary (returned and in summary.json) reports the peak, the test accuracy there,
    # and the last step.
    on_disk = json.loads((run / "summary.json").read_text())
    returned_only = {"val": summary["final"]["val"], "test": summary["final"]["test"]}
    assert {**on_disk, **returned_only, "run_dir": run} == summary
    best, final = summary["best"], summary["final"]
    assert best["step"] == PEAK and final["step"] == 40
    assert best["val"] == {k: val[PEAK][k] for k in ("loss", "accuracy", "count")}
    assert final["val"] == {k: val[40][k] for k in ("loss", "accuracy", "count")}
    tests = {(r["step"], r.get("checkpoint")): r for r in rows if r["split"] == "test"}
    assert tests[(PEAK, "best")]["accuracy"] == best["test"]["accuracy"]
    assert tests[(40, None)]["accuracy"] == final["test"]["accuracy"]
    assert best["test"]["accuracy"] != final["test"]["accuracy"]
    # orbax keeps the 2 latest checkpoints and the best one; evaluation steps are saved
    # with their validation metrics.
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [PEAK, 36, 40]
    # `evaluate` defaults to the best checkpoint and reproduces the reported numbers.
    again = lra_evaluate.evaluate_checkpoint(run)
    assert again["step"] == PEAK
    for split in ("val", "test"):
        assert again[split]["accuracy"] == best[split]["accuracy"]
        assert again[split]["loss"] == pytest.approx(best[split]["loss"], rel=1e-6)
    assert lra_evaluate.main(["--checkpoint", str(run), "--step", "latest", "--split", "test"]) == 0
    r = final["test"]
    assert capsys.readouterr().out.strip() == (
        f"step 40 test: accuracy {r['accuracy']:.4f}, loss {r['loss']:.4f} ({r['count']} examples)"
    )
    with pytest.raises(ValueError, match="step must be 'best', 'latest' or a step number"):
        lra_evaluate.evaluate_checkpoint(run, step="first")
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint for step 12 .*available: \[6, 36, 40\]"
    ):
        lra_evaluate.evaluate_checkpoint(run, step=12)
    assert lra_train.format_summary("peak", summary).startswith(
        f"peak: best val accuracy {best['val']['accuracy']:.4f} at step {PEAK}, test accuracy "
        f"{best['test']['accuracy']:.4f} there"
    )


def _fake_run(root, name, cfg, best_test, final_test=0.5):
    """A run directory with the given config and summary numbers (for the table only)."""
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    entry = {"loss": 1.0, "accuracy": best_test, "count": 10}
    summary = {
        "best": {"step": 5, "val": {**entry, "accuracy": 0.9}, "test": entry},
        "final": {"step": 9, "val": entry, "test": {**entry, "accuracy": final_test}},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_results_table_over_seeds(peak_run, tmp_path, capsys):
    cfg, summary, run = peak_run
    base = json.loads((run / "config.json").read_text())
    shutil.copytree(run, tmp_path / "peak-seed0", ignore=shutil.ignore_patterns("checkpoints"))
    _fake_run(tmp_path, "peak-seed1", {**base, "seed": 1}, best_test=0.25)
    _fake_run(tmp_path, "peak-seed2", {**base, "seed": 2, "lr": 0.5}, best_test=0.5)
    _fake_run(tmp_path, "text-s5", {**base, "task": "text", "model": "s5"}, best_test=0.875)
    accs = [100 * summary["best"]["test"]["accuracy"], 25.0, 50.0]
    mean, std = np.mean(accs), np.std(accs, ddof=1)

    out_md, out_json = tmp_path / "table.md", tmp_path / "table.json"
    assert lra_results.main([str(tmp_path / "peak-seed*"), str(tmp_path / "text-s5"),
                             "--markdown", str(out_md), "--json", str(out_json)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed == out_md.read_text()
    lines = printed.splitlines()
    assert f"| s4d | demo | {mean:.2f} ± {std:.2f} | — | — | — | — | — | — |" in lines
    assert "| s4d | published: S4D-LegS (Gu et al. 2022) | 60.47 | 86.18 | 89.46 | 88.19 " \
           "| 93.06 | 91.95 | 84.89 |" in lines  # fmt: skip
    assert "| s5 | demo | — | 87.50 | — | — | — | — | — |" in lines
    assert any(line.startswith("| s5 | published: S5") and "| 62.15 | 89.31 |" in line
               for line in lines)  # fmt: skip
    assert "- listops / s4d / demo: the runs' configs differ in lr (averaged anyway)" in lines
    groups = json.loads(out_json.read_text())["groups"]
    s4d = next(g for g in groups if g["model"] == "s4d")
    assert s4d["n"] == 3 and s4d["seeds"] == [0, 1, 2]
    assert s4d["test_at_best"]["mean"] == pytest.approx(mean)
    assert s4d["test_at_best"]["std"] == pytest.approx(std)
    assert s4d["best_steps"] == [PEAK, 5, 5]
    assert next(g for g in groups if g["model"] == "s5")["test_at_best"]["std"] is None
    assert lra_results.main([str(tmp_path / "nothing-*")]) == 1
    assert "names no finished run" in capsys.readouterr().err


def test_overwrite_and_resume_refuse_what_is_not_a_run(data_dir, tmp_path, cli_logging, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cfg = _cfg(data_dir, tmp_path, run_name="victim")
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match=r"not an ssmix run directory \(it has no "
                                                  r"\.ssmix-run file\)"):  # fmt: skip
            lra_train.train(cfg, **flags)
    args = ["--task", "listops", "--model", "s4d", "--preset", "demo", "--overwrite",
            "--set", f"out_dir={tmp_path}", "--set", "run_name=victim"]  # fmt: skip
    capsys.readouterr()
    assert lra_train.main(args) == 1
    assert "not an ssmix run directory" in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "keep me"
    for name in ("../escape", "/tmp/abs", "a/b", "..", "."):
        with pytest.raises(ValueError, match="run_name must be a plain directory name"):
            lra_train.run_dir(_cfg(data_dir, tmp_path, run_name=name))
    (tmp_path / "outside").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside out_dir"):
        lra_train.run_dir(_cfg(data_dir, tmp_path / "runs", run_name="link"))
    # A start that fails on the config or the data creates nothing.
    with pytest.raises(ValueError, match="fewer than one batch"):
        lra_train.train(_cfg(data_dir, tmp_path, run_name="big", batch_size=128))
    assert not (tmp_path / "big").exists()


def test_nonfinite_loss_stops_keeping_the_good_checkpoints(data_dir, tmp_path, toy_mixer,
                                                           cli_logging, capsys):  # fmt: skip
    nan = float("nan")
    cfg = _cfg(data_dir, tmp_path, run_name="nan", lr=nan, ssm_lr=nan, ckpt_every=2,
               log_every=100, eval_every=100, max_nonfinite_steps=3)  # fmt: skip
    with pytest.raises(lra_train.NonFiniteLossError,
                       match=r"training stopped: 4 consecutive steps had a non-finite loss, "
                             r"gradient or parameter update \(limit: max_nonfinite_steps = 3; "
                             r"4 such steps in all, the last at step 4\)"):  # fmt: skip
        lra_train.train(cfg)
    # Checked at step 2 (2 < 3 skipped steps) and saved; stopped at step 4 before saving.
    run = tmp_path / "nan"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2]
    exp = lra_train.Experiment(cfg, lra_train.load_data(cfg))
    init = jax.device_get(exp.state["params"])
    mgr = lra_train.checkpoint_manager(run / "checkpoints", 3)
    assert lra_train.restore_checkpoint(mgr, exp, 2) == 2
    mgr.close()
    saved = jax.device_get(exp.state["params"])
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(init), strict=True):
        assert np.all(np.isfinite(a)) and np.array_equal(a, b)  # skipped updates
    assert jax.device_get(exp.state["nonfinite"]["total"]) == 2
    # Through the CLI: exit status 1, one error line, and a run that stopped before its
    # first checkpoint leaves no directory.
    args = ["--task", "listops", "--model", "s4d", "--preset", "demo"]
    sets = {**_toy_overrides(data_dir, tmp_path), "d_model": 8, "n_layers": 1, "max_len": 48,
            "pad_multiple": 48, "max_steps": 30, "lr": "nan", "ssm_lr": "nan",
            "log_every": 1, "ckpt_every": 1000, "eval_every": 100, "max_nonfinite_steps": 5,
            "run_name": "nan-cli"}  # fmt: skip
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, dict) else value}"]
    capsys.readouterr()
    assert lra_train.main(args) == 1
    assert "consecutive steps had a non-finite loss" in capsys.readouterr().err
    assert not (tmp_path / "nan-cli").exists()


def _empty(path):
    path.write_bytes(b"")


def test_corrupted_checkpoints_and_half_written_metrics(
    peak_run, data_dir, tmp_path, toy_mixer, cli_logging, capsys
):
    cfg, summary, run = peak_run
    copy = tmp_path / "peak"
    shutil.copytree(run, copy)
    config = {**json.loads((run / "config.json").read_text()), "out_dir": str(tmp_path)}
    (copy / "config.json").write_text(json.dumps(config))
    fields = {k: v for k, v in config.items() if k not in ("task", "model", "preset")}
    cfg = make_config("listops", "s4d", "demo", fields)
    _empty(copy / "checkpoints" / "40" / "state" / "_METADATA")
    # One clear error naming the step (not a bare JSONDecodeError), and the other steps.
    expected = (r"checkpoint step 40 in .* cannot be read: it is corrupted or does not match "
                r"this model \(JSONDecodeError: .*other steps: \[6, 36\]")  # fmt: skip
    with pytest.raises(lra_train.CheckpointError, match=expected):
        lra_evaluate.evaluate_checkpoint(copy, step="latest")
    assert lra_evaluate.main(["--checkpoint", str(copy / "checkpoints" / "40")]) == 1
    assert lra_evaluate.evaluate_checkpoint(copy, step=36, splits=("val",))["step"] == 36
    # Unreadable orbax metrics (read while listing the steps) name their step too.
    broken = tmp_path / "broken-metrics"
    shutil.copytree(run, broken)
    _empty(broken / "checkpoints" / "36" / "metrics" / "metrics")
    with pytest.raises(lra_train.CheckpointError, match=r"metrics of checkpoint step\(s\) \[36\]"):
        lra_evaluate.evaluate_checkpoint(broken)
    # --resume falls back to the newest intact checkpoint (said in the log), moving the
    # broken one aside; a half-written last metrics line does not stop it either.
    rows_before = lra_train.read_metrics(copy / "metrics.jsonl")
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "split": "tr')
    capsys.readouterr()
    resumed = lra_train.train(cfg, resume=True)
    assert "checkpoint(s) [40] unreadable: fell back to step 36" in capsys.readouterr().err
    assert (copy / "corrupted_checkpoints" / "40" / "state").is_dir()
    assert resumed["status"] == "done" and resumed["final"]["step"] == 40
    rows = lra_train.read_metrics(copy / "metrics.jsonl")
    assert rows[:-4] == [r for r in rows_before if r["step"] <= 36 and r["split"] != "test"]
    assert [(r["step"], r["split"], r.get("checkpoint")) for r in rows[-4:]] == [
        (40, "train", None), (40, "val", None), (40, "test", None), (PEAK, "test", "best")
    ]  # fmt: skip
    assert resumed["best"]["step"] == PEAK
    assert sorted(int(p.name) for p in (copy / "checkpoints").iterdir()) == [PEAK, 36, 40]


def test_atomic_writes_and_metrics_lines(tmp_path, cli_logging, capsys):
    path = tmp_path / "config.json"
    lra_train.write_atomic(path, '{"a": 1}\n')
    lra_train.write_atomic(path, '{"a": 2}\n')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "split": "val"}\n{"step": 2, "spl')
    capsys.readouterr()
    assert lra_train.read_metrics(metrics) == [{"step": 1, "split": "val"}]
    assert "ignoring a half-written last line 2" in capsys.readouterr().err
    log = lra_train.MetricsLog(metrics, True)
    log.truncate_after(5)
    assert metrics.read_text() == '{"step": 1, "split": "val"}\n'
    metrics.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON object"):
        lra_train.read_metrics(metrics)
