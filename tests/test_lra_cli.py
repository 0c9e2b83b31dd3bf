"""The LRA command line as a user meets it: log lines, --resume RUN_DIR (extending a run,
resuming a finished one), --print-config, --list-presets, configuration errors as usage
errors before any data is loaded, the missing-data message, SIGTERM, the demo's resume and
refusal, relative paths, gradient accumulation and bfloat16 steps."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import experiments.lra.models as lra_models
from experiments.lra import demo as lra_demo
from experiments.lra import train as lra_train
from experiments.lra.configs import make_config
from experiments.lra.listops import write_listops
from tests.test_lra_real_layers import shared_compilations  # noqa: F401 (fixture)
from tests.test_lra_train import CausalMeanMixer, _comparable, _toy_overrides

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--task", "listops", "--model", "s4d", "--preset", "demo"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops_cli")
    return write_listops(root, n_train=32, n_val=8, n_test=8, seed=7, min_length=6,
                         max_length=30)  # fmt: skip


@pytest.fixture
def toy_mixer(monkeypatch):
    monkeypatch.setattr(lra_models, "mixer_class", lambda model: CausalMeanMixer)


def _tiny(data_dir, out_dir, **extra):
    values = _toy_overrides(
        data_dir, out_dir, d_model=8, n_layers=1, max_len=32, pad_multiple=32, batch_size=8,
        dropout=0.0, log_every=2, eval_every=4, ckpt_every=4, max_steps=4,
    )  # fmt: skip
    values.update(extra)
    return values


def _sets(values):
    pairs = [f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in values.items()]
    return sum((["--set", p] for p in pairs), [])


def _usage_error(capsys, argv, main=lra_train.main):
    """Run ``main(argv)`` expecting a usage error: exit status 2, one error line, no
    traceback; returns the error line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


def test_print_config_and_list_presets(capsys, tmp_path):
    assert lra_train.main(ARGS + ["--set", "lr=0.5", "--set", "grad_accum=2",
                                  "--print-config"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed == make_config("listops", "s4d", "demo", ["lr=0.5", "grad_accum=2"]).to_dict()
    # --print-config of a run directory: its own config with the allowed change applied.
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(printed))
    assert lra_train.main(["--resume", str(run), "--set", "max_steps=7", "--print-config"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed == {**printed, "max_steps": 7, "out_dir": str(tmp_path.resolve()),
                       "run_name": "r"}  # fmt: skip
    assert lra_train.main(["--list-presets", "--model", "s5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "model", "preset", "source"]
    assert len(lines) == 1 + 6 * 2  # published and demo of the 6 tasks (no s4-2023 for S5)
    assert any(
        line.split()[:3] == ["pathx", "s5", "published"]
        and line.endswith("lindermanlab/S5@3c18fdb bin/run_experiments/run_lra_pathx.sh")
        for line in lines
    )
    assert not (tmp_path / "runs").exists()


def test_configuration_errors_are_usage_errors_before_loading(capsys, tmp_path):
    base = ARGS + ["--set", f"data_dir={tmp_path / 'no-data'}", "--set", f"out_dir={tmp_path}"]
    line = _usage_error(capsys, base + ["--set", "max_step=10"])
    assert "unknown config key 'max_step'; did you mean max_steps" in line
    line = _usage_error(capsys, base + ["--set", "max_steps=ten"])
    assert line.endswith("max_steps: expected an integer; got 'ten'")
    line = _usage_error(capsys, base + ["--set", "mixer.d_sate=4"])
    assert "S4D (model 's4d') takes no argument 'd_sate'; did you mean mixer.d_state?" in line
    assert "S4D accepts: d_state, channels, init," in line
    line = _usage_error(capsys, ["--set", "lr=1"])
    assert "--task and --model are required (or --resume RUN_DIR)" in line
    line = _usage_error(capsys, ["--resume", str(tmp_path)])
    assert "is not a run directory (no config.json)" in line
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(make_config("listops", "s4d").to_dict()))
    line = _usage_error(capsys, ["--resume", str(run), "--set", "lr=0.5", "--set", "epochs=3"])
    assert "lr cannot change when a run is resumed" in line
    # Nothing was loaded or created: the data folder does not even exist.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    # check_mixer_args directly: the layer's own signature, not the config's.
    cfg = make_config("listops", "attention", overrides=["mixer.features=8"])
    with pytest.raises(ValueError, match="mixer.features cannot be set: the model passes"):
        lra_models.check_mixer_args(cfg)
    lra_models.check_mixer_args(make_config("pathx", "s5-ptd"))  # every preset's args exist


def test_missing_data_is_one_line_and_leaves_no_run_directory(capsys, tmp_path):
    out = tmp_path / "runs"
    argv = ARGS + ["--set", f"data_dir={tmp_path / 'nothing'}", "--set", f"out_dir={out}"]
    assert lra_train.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if "error:" in x]
    assert "listops data not found" in line
    assert f"python -m experiments.lra.listops --out {tmp_path / 'nothing'}" in line
    assert "lra_release/lra_release/<folder>" in line
    assert not out.exists()


def test_resume_run_dir_extends_and_finished_run_is_unchanged(
    data_dir,
    tmp_path,
    toy_mixer,
    capsys,
    shared_compilations,  # noqa: F811
):
    values = _tiny(data_dir, tmp_path)
    assert lra_train.main(ARGS + _sets(values)) == 0
    run = tmp_path / "listops-s4d-demo"
    err = capsys.readouterr().err
    assert re.search(r"listops-s4d-demo: \d+ parameters, 32 train examples, 4 steps \(4 per "
                     r"epoch\) on 1 device", err), err  # fmt: skip
    for line in ("loading the listops data from", "compiling the train step",
                 "step 2/4: loss", "step 4: val loss"):  # fmt: skip
        assert line in err, line
    rows = lra_train.read_metrics(run / "metrics.jsonl")
    # Resuming the finished run at its own length: reported, nothing written.
    assert lra_train.main(["--resume", str(run)]) == 0
    assert "already finished at step 4" in capsys.readouterr().err
    assert lra_train.read_metrics(run / "metrics.jsonl") == rows
    assert lra_train.main(ARGS + _sets(values) + ["--resume"]) == 0  # the flags' form
    assert "already finished at step 4" in capsys.readouterr().err
    assert lra_train.read_metrics(run / "metrics.jsonl") == rows
    # A larger max_steps extends it; the schedule keeps its length (4 updates).
    assert lra_train.main(["--resume", str(run), "--set", "max_steps=6"]) == 0
    assert f"resumed {run} at step 4 of 6" in capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["max_steps"], saved["schedule_steps"]) == (6, 4)
    extended = lra_train.read_metrics(run / "metrics.jsonl")
    keys = [(r["split"], r["step"], r.get("checkpoint")) for r in extended]
    assert len(keys) == len(set(keys))  # no duplicated rows
    assert _comparable(extended[: len(rows) - 2]) == _comparable(rows[:-2])  # minus test rows
    # ... and equals a 6-step run made with that schedule from the start.
    straight = {**values, "run_name": "straight", "max_steps": 6, "schedule_steps": 4}
    assert lra_train.main(ARGS + _sets(straight)) == 0
    capsys.readouterr()
    rows_straight = lra_train.read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert _comparable(rows_straight) == _comparable(extended)


_SIGTERM_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import experiments.lra.models as lra_models
from tests.test_lra_train import CausalMeanMixer
lra_models.mixer_class = lambda model: CausalMeanMixer
from experiments.lra import train
sys.exit(train.main({argv!r}))
"""


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(data_dir, tmp_path):
    values = _tiny(data_dir, tmp_path, max_steps=100_000, eval_every=100_000,
                   ckpt_every=100_000, log_every=100_000)  # fmt: skip
    script = _SIGTERM_SCRIPT.format(repo=str(REPO), argv=ARGS + _sets(values))
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        err = ""
        deadline = time.monotonic() + 240
        while "first step done" not in err and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            err += line
        assert "first step done" in err, err
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err += rest
    assert proc.returncode == 130, err[-3000:]
    run = tmp_path / "listops-s4d-demo"
    [step] = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert 1 <= step < 100_000
    assert f"interrupted (SIGTERM): saved step {step} to {run}" in err
    # The interpreter is "python" or its path, as the child's PATH says (python_command).
    command = re.escape(f" -m experiments.lra.train --resume {run}")
    assert re.fullmatch(rf"interrupted at step {step}; continue with: \S*python\S*{command}",
                        out.strip()), out  # fmt: skip


def test_demo_refuses_an_existing_run_and_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lra_demo, "demo_data_dir", lambda: tmp_path / "data")
    run = tmp_path / lra_demo.RUN_NAME
    run.mkdir()
    (run / lra_train.RUN_MARKER).write_text("")
    (run / "keep").write_text("x")

    def no_data(*args, **kwargs):
        raise AssertionError("the demo generated data for a run it refuses")

    monkeypatch.setattr(lra_demo, "ensure_data", no_data)
    argv = ["--steps", "5", "--set", f"out_dir={tmp_path}"]
    assert lra_demo.main(argv) == 1
    err = capsys.readouterr().err
    assert "holds a demo run: pass --resume to continue it or --overwrite" in err
    assert (run / "keep").exists()
    # --resume reaches train(); an interrupt prints the command that continues.
    calls = []
    monkeypatch.setattr(lra_demo, "ensure_data", lambda *a, **k: None)

    def fake_train(cfg, *, resume, overwrite):
        calls.append((cfg.max_steps, resume, overwrite))
        return {"status": "interrupted", "step": 3, "run_dir": run, "signal": "SIGINT"}

    monkeypatch.setattr(lra_demo, "train", fake_train)
    assert lra_demo.main(argv + ["--resume"]) == 130
    assert calls == [(5, True, False)]
    expected = f"{lra_train.python_command()} -m experiments.lra.demo --steps 5 --set " \
               f"out_dir={tmp_path} --resume"  # fmt: skip
    assert capsys.readouterr().out.strip().endswith(f"continue with: {expected}")
    assert _usage_error(capsys, ["--set", "mixer.d_sate=4"], lra_demo.main)


def test_relative_paths_follow_the_checkout_or_the_working_directory(tmp_path, monkeypatch):
    cfg = make_config("listops", "s4d", "demo", {"out_dir": "runs", "data_dir": "d"})
    monkeypatch.setattr(lra_train, "in_checkout", lambda: True)
    assert lra_train.run_dir(cfg) == lra_train.REPO_ROOT / "runs" / cfg.name
    monkeypatch.setattr(lra_train, "in_checkout", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert lra_train.run_dir(cfg) == tmp_path / "runs" / cfg.name
    assert lra_train.data_path(cfg) == tmp_path / "d"
    assert lra_train.data_path(make_config("listops", "s4d")) == tmp_path / "data" / "listops-1000"
    assert lra_demo.demo_data_dir() == tmp_path / "data" / "listops-demo"


def test_grad_accum_equals_the_large_batch_and_bfloat16_steps(data_dir, tmp_path, toy_mixer):
    """Two accumulated batches of 8 give the parameters of one step on the same 16
    examples (the schedule counts updates: both runs have 10); a bfloat16 step keeps float32
    masters and optimiser state and has a finite loss."""
    common = _tiny(data_dir, tmp_path, norm="layer", warmup_ratio=0.0, length_grouping=0)
    big = make_config("listops", "s4d", "demo", {**common, "batch_size": 16, "max_steps": 10})
    acc = make_config("listops", "s4d", "demo", {**common, "grad_accum": 2, "max_steps": 20})
    data = lra_train.load_data(big)
    exp_big, exp_acc = lra_train.Experiment(big, data), lra_train.Experiment(acc, data)
    start = jax.device_get(exp_big.state["params"])
    np.testing.assert_array_equal(
        exp_big.train_batch(0)["x"], np.concatenate([exp_acc.train_batch(i)["x"] for i in (0, 1)])
    )
    exp_big.train_step(0)
    exp_acc.train_step(0)
    half = jax.device_get(exp_acc.state["params"])
    exp_acc.train_step(1)
    for a, b, s, h in zip(*(jax.tree.leaves(t) for t in (
            jax.device_get(exp_big.state["params"]), jax.device_get(exp_acc.state["params"]),
            start, half)), strict=True):  # fmt: skip
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(h, s)  # no update after the first micro-batch
    assert any(
        not np.allclose(a, s)
        for a, s in zip(
            jax.tree.leaves(jax.device_get(exp_big.state["params"])),
            jax.tree.leaves(start),
            strict=True,
        )
    )
    assert exp_acc.lr_at(4) == exp_big.lr_at(2) != exp_big.lr_at(1)

    bf16 = make_config("listops", "s4d", "demo", {**common, "precision": "bfloat16"})
    exp = lra_train.Experiment(bf16, data)
    compute = exp._compute_params(exp.state["params"])
    mixer, block = compute["blocks"][0]["mixer"], compute["blocks"][0]
    assert mixer["log_scale"].dtype == mixer["proj"]["kernel"].dtype == np.float32
    assert block["out"]["kernel"].dtype == compute["encoder"]["embedding"].dtype == "bfloat16"
    assert compute["head"]["kernel"].dtype == "bfloat16"
    exp.train_step(0)
    window = exp.take_window()
    assert np.isfinite(window["loss"])
    dtypes = {x.dtype for x in jax.tree.leaves((exp.state["params"], exp.state["opt"]))}
    assert dtypes <= {np.dtype("float32"), np.dtype("int32")}, dtypes
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16"):
        make_config("listops", "s4d", overrides=["precision=float16"])
