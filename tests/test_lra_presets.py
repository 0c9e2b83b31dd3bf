"""LRA presets against the anchors' files, the optimiser groups and schedules they need, and
config validation (issue 18 items 1-2, issue 20 item 8).

The tables below are written from the anchor files themselves (paths in each row), not
from experiments/lra/configs.py: a preset that drifts from its anchor fails here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.lra import models as lra_models
from experiments.lra.configs import MODELS, TASKS, Config, make_config
from experiments.lra.data import Ragged, Split, TaskData
from ssmix.optim import s5_schedule

# ---------------------------------------------------------------------------------------
# Anchor tables.
# ---------------------------------------------------------------------------------------

# state-spaces/s4 configs/experiment/lra/old/v3-s4-<file>.yaml (+ defaults: scheduler
# num_warmup_steps 1000 where unset; layer wd 0.0; n_ssm ${..d_model} / null = H).
# task: (file, layers, H, N, n_ssm, dropout, norm, prenorm, pooling, dt_min, dt_max, batch,
#        epochs, lr, wd, warmup steps, num_training_steps, layer lr:)
S4_V3 = {
    "listops": ("listops", 8, 128, 64, 128, 0.0, "batch", False, "masked_mean", 1e-3, 0.1, 50,
                40, 0.01, 0.05, 1000, 80000, {"dt": None, "A": 1e-3, "B": 1e-3}),
    "text": ("imdb", 6, 256, 64, 256, 0.0, "batch", True, "masked_mean", 1e-3, 0.1, 16, 32,
             0.01, 0.05, 1000, 50000, {"dt": None, "A": 1e-3, "B": 1e-3}),
    "retrieval": ("aan", 6, 256, 64, 256, 0.0, "batch", True, "masked_mean", 1e-3, 0.1, 64, 20,
                  0.01, 0.05, 2500, 50000, {"dt": None, "A": 1e-3, "B": 1e-3}),
    "image": ("cifar", 6, 512, 64, 2, 0.1, "layer", False, "mean", 1e-3, 0.1, 50, 200, 0.01,
              0.05, 900, 180000, {"dt": None, "A": 1e-3, "B": 1e-3}),
    "pathfinder": ("pathfinder", 6, 256, 64, 256, 0.0, "batch", True, "last", 1e-3, 0.1, 64,
                   200, 0.004, 0.03, 2500, 500000, 1e-3),
    "pathx": ("pathx", 6, 256, 64, 256, 0.0, "batch", True, "mean", 1e-4, 0.1, 16, 50, 0.001,
              0.05, 50000, 500000, 5e-4),
}  # fmt: skip
# AnnanYu/Approximate_Diagonal S4-PTD/configs/experiment/lra/s4-PTD-<file>.yaml (same columns).
S4_PTD = {
    "listops": ("listops", 8, 256, 64, 1, 0.0, "batch", False, "masked_mean", 1e-3, 1.0, 50, 80,
                0.002, 0.05, 12000, 1200000, {"dt": 4e-4, "A": 4e-4, "B": 4e-4}),
    "text": ("imdb", 6, 256, 64, 1, 0.0, "batch", True, "masked_mean", 1e-3, 0.1, 16, 80, 0.01,
             0.05, 5000, 50000, {"dt": None, "A": 1e-3, "B": 1e-3}),
    "retrieval": ("aan", 6, 128, 64, 1, 0.0, "batch", True, "masked_mean", 1e-3, 0.1, 64, 40,
                  0.004, 0.03, 5000, 100000, {"dt": None, "A": 1e-3, "B": 1e-3}),
    "image": ("cifar", 6, 128, 64, 1, 0.1, "layer", False, "mean", 1e-3, 0.1, 128, 2000, 0.01,
              0.01, 3600, 1760000, 1e-3),
    "pathfinder": ("pathfinder", 6, 256, 64, 1, 0.0, "batch", True, "mean", 1e-3, 0.1, 64, 300,
                   0.004, 0.03, 150000, 800000, 1e-3),
    "pathx": ("pathx", 6, 128, 64, 1, 0.0, "batch", True, "mean", 1e-4, 0.1, 20, 100, 0.001,
              0.03, 200000, 1250000, 1e-3),
}  # fmt: skip
# lindermanlab/S5 bin/run_experiments/run_lra_<file>.sh over run_train.py defaults.
# task: (file, layers, H, P, blocks, dropout, bn_momentum, glu, batch, epochs, ssm_lr,
#        lr_factor, wd, warmup_end, opt_config, dt_global, C_init, clip_eigs, dt_min, seed)
S5_RUNS = {
    "listops": ("listops", 8, 128, 16, 8, 0.0, 0.95, "half2", 50, 40, 1e-3, 3, 0.04, 1,
                "BfastandCdecay", False, "lecun_normal", False, 1e-3, 6554595),
    "text": ("imdb", 6, 256, 192, 12, 0.1, 0.95, "half2", 50, 35, 1e-3, 4, 0.07, 0, "standard",
             True, "lecun_normal", False, 1e-3, 8825365),
    "retrieval": ("aan", 6, 128, 256, 16, 0.0, 0.95, "half1", 32, 20, 1e-3, 2, 0.05, 1,
                  "standard", True, "trunc_standard_normal", False, 1e-3, 5464368),
    "image": ("cifar", 6, 512, 384, 3, 0.1, 0.95, "half1", 50, 250, 1e-3, 4.5, 0.07, 1,
              "BfastandCdecay", False, "lecun_normal", True, 1e-3, 16416),
    "pathfinder": ("pathfinder", 6, 192, 256, 8, 0.05, 0.9, "half1", 64, 200, 9e-4, 5, 0.03, 1,
                   "standard", False, "trunc_standard_normal", False, 1e-3, 8180844),
    "pathx": ("pathx", 6, 128, 256, 16, 0.0, 0.9, "half1", 32, 75, 6e-4, 3, 0.06, 1,
              "BandCdecay", False, "complex_normal", False, 1e-4, 6429262),
}  # fmt: skip
# AnnanYu/Approximate_Diagonal S5-PTD/bin/run_experiments/run_lra_<file>.sh (same columns).
S5_PTD_RUNS = {
    "listops": ("listops", 8, 128, 16, 8, 0.0, 0.95, "half2", 50, 35, 1e-3, 3, 0.05, 1,
                "BfastandCdecay", False, "lecun_normal", False, 1e-3, 6554595),
    "text": ("imdb", 6, 256, 192, 12, 0.1, 0.95, "half2", 50, 40, 1e-3, 4, 0.07, 5, "standard",
             True, "lecun_normal", False, 1e-3, 8825365),
    "retrieval": ("aan", 6, 128, 256, 16, 0.0, 0.95, "half1", 32, 20, 1e-3, 2, 0.05, 1,
                  "standard", True, "trunc_standard_normal", False, 1e-3, 5464368),
    "image": ("cifar", 6, 512, 384, 3, 0.1, 0.95, "half1", 50, 250, 1e-3, 5, 0.07, 1,
              "BfastandCdecay", False, "lecun_normal", True, 1e-3, 16418),
    "pathfinder": ("pathfinder", 6, 192, 256, 8, 0.05, 0.9, "half1", 64, 230, 9e-4, 5, 0.05, 10,
                   "standard", False, "trunc_standard_normal", False, 1e-3, 8180844),
    "pathx": ("pathx", 6, 128, 256, 16, 0.0, 0.9, "half1", 32, 90, 6e-4, 3, 0.06, 1,
              "BandCdecay", False, "complex_normal", False, 1e-4, 6429262),
}  # fmt: skip


def effective(cfg, name):
    """(learning rate, weight decay) the config gives mixer parameter ``name``."""
    group = cfg.param_groups[name]
    lr = cfg.ssm_lr if group.startswith("ssm") else cfg.lr
    wd = cfg.weight_decay if group in ("ssm_decay", "default") else 0.0
    return lr, wd


def s4_expected_rates(model, lr, wd, block):
    """(lr, wd) per ssmix parameter from an S4 ``lr:`` block, read off the anchor code by
    hand: dt/A/B registered with wd 0 (lr None = main); C registered with wd None (main
    decay) and the block's rate only when the block is one number; D plain. S4-PTD's kernel
    registers only dt and A (B folded into C, C plain)."""

    def rate(key):
        value = block if not isinstance(block, dict) else block.get(key)
        return lr if value is None else value

    plain = (lr, wd)
    if model == "s4-ptd":
        return {"log_dt": (rate("dt"), 0.0), "A_re_log": (rate("A"), 0.0),
                "A_im": (rate("A"), 0.0), "B": plain, "C": plain, "D": plain}  # fmt: skip
    rates = {"log_dt": (rate("dt"), 0.0), "A_re_log": (rate("A"), 0.0), "A_im": (rate("A"), 0.0),
             "B": (rate("B"), 0.0), "C": (rate("C"), wd), "D": plain}  # fmt: skip
    if model == "s4":
        rates["P"] = (rate("A"), 0.0)
    return rates


@pytest.mark.parametrize("model", ["s4", "s4d", "s4-ptd"])
@pytest.mark.parametrize("task", TASKS)
def test_s4_family_presets_equal_anchor_files(task, model):
    table = S4_PTD if model == "s4-ptd" else S4_V3
    (file, layers, h, n, n_ssm, dropout, norm, prenorm, pooling, dt_min, dt_max, batch, epochs,
     lr, wd, warmup, total, block) = table[task]  # fmt: skip
    cfg = make_config(task, model)
    assert cfg.source.endswith(
        f"s4-PTD-{file}.yaml" if model == "s4-ptd" else f"old/v3-s4-{file}.yaml"
    )
    got = (cfg.n_layers, cfg.d_model, cfg.mixer["d_state"], cfg.mixer.get("n_ssm") or cfg.d_model,
           cfg.dropout, cfg.norm, cfg.prenorm, cfg.pooling, cfg.mixer["dt_min"],
           cfg.mixer["dt_max"], cfg.batch_size, cfg.epochs, cfg.lr, cfg.weight_decay,
           cfg.warmup_steps, cfg.schedule_steps)  # fmt: skip
    assert got == (layers, h, n, n_ssm, dropout, norm, prenorm, pooling, dt_min, dt_max, batch,
                   epochs, lr, wd, warmup, total)  # fmt: skip
    assert (cfg.warmup_ratio, cfg.warmup_epochs, cfg.schedule) == (0.0, 0.0, "cosine")
    assert cfg.mixer["bidirectional"] is True and cfg.glu == "full" and cfg.final_norm
    assert cfg.norm_momentum == 0.9  # PyTorch BatchNorm1d momentum 0.1
    assert cfg.mixer["init"] == ("ptd" if model == "s4-ptd" else "legs")
    rates = {name: effective(cfg, name) for name in cfg.param_groups}
    assert rates == s4_expected_rates(model, lr, wd, block)
    # S4: configs/config.yaml optimizer_param_grouping; S4-PTD's config.yaml has none.
    assert cfg.no_decay == ([] if model == "s4-ptd" else ["bias", "norm", "embedding"])
    tokens = task in ("listops", "text", "retrieval")
    assert (cfg.pad_multiple, cfg.length_grouping > 0) == (128 if tokens else cfg.max_len, tokens)


def s5_expected_rates(lr, ssm_lr, wd, opt_config, dt_global):
    """s5/train_helpers.py create_train_state, by hand: "ssm" = Adam(ssm_lr), "regular" =
    AdamW(lr, wd), BandCdecay's "none" = AdamW(ssm_lr, wd)."""
    ssm, regular = (ssm_lr, 0.0), (lr, wd)
    b = {"standard": ssm, "BandCdecay": (ssm_lr, wd), "BfastandCdecay": regular,
         "noBCdecay": ssm}[opt_config]  # fmt: skip
    cd = ssm if opt_config == "noBCdecay" else regular
    return {"Lambda_re": ssm, "Lambda_im": ssm, "B": b, "C": cd, "D": cd,
            "log_step": regular if dt_global else ssm}  # fmt: skip


@pytest.mark.parametrize("model", ["s5", "s5-ptd"])
@pytest.mark.parametrize("task", TASKS)
def test_s5_family_presets_equal_run_scripts(task, model):
    (file, layers, h, p, blocks, dropout, momentum, glu, batch, epochs, ssm_lr, factor, wd,
     warmup, opt_config, dt_global, c_init, clip, dt_min, seed) = (
        S5_PTD_RUNS if model == "s5-ptd" else S5_RUNS)[task]  # fmt: skip
    cfg = make_config(task, model)
    prefix = "S5-PTD/" if model == "s5-ptd" else ""
    assert cfg.source.endswith(f"{prefix}bin/run_experiments/run_lra_{file}.sh")
    got = (cfg.n_layers, cfg.d_model, cfg.mixer["d_state"], cfg.mixer["blocks"], cfg.dropout,
           cfg.norm_momentum, cfg.glu, cfg.batch_size, cfg.epochs, cfg.ssm_lr,
           cfg.weight_decay, cfg.warmup_epochs, cfg.mixer["C_init"], cfg.mixer["clip_eigs"],
           cfg.mixer["dt_min"], cfg.mixer["dt_max"], cfg.seed)  # fmt: skip
    assert got == (layers, h, p, blocks, dropout, momentum, glu, batch, epochs, ssm_lr, wd,
                   warmup, c_init, clip, dt_min, 0.1, seed)  # fmt: skip
    assert cfg.lr == pytest.approx(factor * ssm_lr, rel=1e-12)
    assert (cfg.norm, cfg.prenorm, cfg.final_norm, cfg.schedule) == ("batch", True, False, "s5")
    assert (cfg.warmup_steps, cfg.warmup_ratio, cfg.no_decay) == (0, 0.0, [])
    assert cfg.mixer["bidirectional"] is True and cfg.mixer.get("dt_global", False) is dt_global
    assert cfg.mixer["conj_sym"] is (model == "s5")  # S5-PTD/s5/train.py: conj_sym = False
    assert cfg.mixer.get("init", "legs") == ("ptd" if model == "s5-ptd" else "legs")
    assert cfg.pooling == ("masked_mean" if task in ("listops", "text", "retrieval") else "mean")
    rates = {name: effective(cfg, name) for name in cfg.param_groups}
    assert rates == s5_expected_rates(cfg.lr, ssm_lr, wd, opt_config, dt_global)


def test_other_presets():
    """The 2023 S4 set keeps its values under its own name; Hydra / attention say they are
    ssmix's choice; presets without a source are refused."""
    s4 = make_config("listops", "s4", "s4-2023")
    assert (s4.n_layers, s4.d_model, s4.mixer["d_state"], s4.mixer["n_ssm"], s4.batch_size,
            s4.warmup_steps, s4.schedule_steps, s4.seed) == (6, 256, 4, 1, 32, 12000, 120000,
                                                             3333)  # fmt: skip
    assert s4.source.endswith("configs/experiment/lra/s4-listops.yaml")
    image = make_config("image", "s4d", "s4-2023")
    assert (image.norm, image.param_groups["C"], image.param_groups["log_dt"]) == (
        "batch",
        "ssm_decay",
        "ssm",
    )
    for model in ("hydra", "attention"):
        assert "ssmix's own choice" in make_config("text", model).source
    with pytest.raises(ValueError, match="preset 's4-2023'.*covers the models s4, s4d"):
        make_config("listops", "s5", "s4-2023")
    demo = make_config("listops", "s5", "demo")
    assert (demo.seed, demo.schedule, demo.warmup_epochs, demo.warmup_ratio) == (0, "cosine", 0.0,
                                                                                 0.1)  # fmt: skip
    assert demo.final_norm is False and demo.param_groups["B"] == "default"


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer; got 0"),
        ({"ckpt_every": 0}, ValueError, "ckpt_every must be a positive integer; got 0"),
        ({"log_every": 0}, ValueError, "log_every must be a positive integer; got 0"),
        ({"d_model": -4}, ValueError, "d_model must be a positive integer"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
        ({"max_len": 0}, ValueError, "max_len must be a positive integer"),
        ({"pad_multiple": 0}, ValueError, "pad_multiple must be a positive integer"),
        ({"keep_checkpoints": 0}, ValueError, "keep_checkpoints must be a positive"),
        ({"eval_every": -1}, ValueError, "eval_every must be a non-negative integer"),
        ({"max_steps": -5}, ValueError, "max_steps must be a non-negative integer"),
        ({"n_layers": 2.5}, TypeError, "n_layers must be an integer"),
        ({"lr": -1e-3}, ValueError, r"lr must be a finite number >= 0"),
        ({"weight_decay": float("inf")}, ValueError, "weight_decay must be a finite number"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"norm_momentum": 1.5}, ValueError, r"norm_momentum must be in \[0, 1\)"),
        ({"warmup_steps": 10}, ValueError, "warmup_ratio and warmup_steps are both non-zero"),
        ({"schedule": "linear"}, ValueError, "schedule must be one of cosine, s5"),
        ({"pooling": "max"}, ValueError, "pooling must be one of"),
        ({"no_decay": ["biases"]}, ValueError, "no_decay must be a list of bias, norm"),
        ({"param_groups": {"B": "fast"}}, ValueError, "param_groups must map parameter names"),
        ({"final_norm": 1}, TypeError, "final_norm must be a bool"),
    ],
)
def test_impossible_values_are_named(overrides, error, message):
    with pytest.raises(error, match=message):
        make_config("listops", "attention", "demo", overrides)


def test_config_strings_and_json_round_trip():
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        make_config("text", "s5", overrides=["batch_size=0"])
    with pytest.raises(ValueError, match="log_every: expected an integer; got 'often'"):
        make_config("text", "s5", overrides=["log_every=often"])
    cfg = make_config("pathfinder", "s4", overrides=['param_groups={"C": "default"}',
                                                     'no_decay=["bias"]'])  # fmt: skip
    assert cfg.param_groups == {"C": "default"} and cfg.no_decay == ["bias"]
    for task in TASKS:
        for model in MODELS:
            cfg = make_config(task, model)
            assert Config.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------------------


def hf_cosine(step, warmup, total):
    """transformers.get_cosine_schedule_with_warmup's factor (num_cycles 0.5)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def s5_loop_rates(base, steps_per_epoch, epochs, warmup_end, lr_min=0.0):
    """The rate of every step in lindermanlab/S5's loop (s5/train.py + train_helpers.py):
    the optimiser starts at ``base`` and is reset after every step from the step count."""
    current, rates, step = base, [], 0
    for epoch in range(epochs):
        if epoch < warmup_end:
            end = steps_per_epoch * warmup_end
            fn = lambda s, end=end: base * (s + 1) / end  # noqa: E731
        else:
            end = steps_per_epoch * epochs - steps_per_epoch * warmup_end
            fn = lambda s, end=end: (base - lr_min) * 0.5 * (  # noqa: E731
                1 + math.cos(math.pi * min(s, end) / end)) + lr_min  # fmt: skip
        for _ in range(steps_per_epoch):
            rates.append(current)
            current = fn(step)
            step += 1
    return rates


class Linear(nnx.Module):
    """A stand-in model for the schedule tests (groups do not matter there)."""

    def __init__(self):
        self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))


def test_s4_cosine_schedule_is_the_anchors(x64):
    """ListOps v3: 1,000 warmup steps, cosine over num_training_steps = 80,000, longer than
    the run's 40 × 1,920 = 76,800 steps: the rate never reaches 0."""
    cfg = make_config("listops", "s4d", overrides={"param_groups": {}})
    _, schedule, warmup = lra_models.build_optimizer(cfg, Linear(), steps_per_epoch=1920,
                                                     total_steps=76800)  # fmt: skip
    assert warmup == 1000
    for step in (0, 1, 500, 999, 1000, 1001, 40000, 76799, 80000):
        want = 0.01 * hf_cosine(step, 1000, 80000)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-12, abs=1e-15), step
    assert float(schedule(76799)) > 1e-5


@pytest.mark.parametrize("warmup_end", [0, 1, 2])
def test_s5_schedule_is_the_loops(warmup_end, x64):
    spe, epochs = 7, 5
    want = s5_loop_rates(3e-3, spe, epochs, warmup_end)
    schedule = jax.jit(s5_schedule(3e-3, warmup_end * spe, spe * epochs))
    got = [float(schedule(j)) for j in range(spe * epochs)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_warmup_given_in_epochs_or_steps():
    cfg = make_config("text", "s5-ptd", overrides={"param_groups": {}})
    model = Linear()
    _, schedule, warmup = lra_models.build_optimizer(cfg, model, steps_per_epoch=10,
                                                     total_steps=400)  # fmt: skip
    assert warmup == 5 * 10  # warmup_end=5 epochs
    assert float(schedule(25)) == pytest.approx(4e-3 * 25 / 50, rel=1e-6)
    cfg = make_config("text", "s5", overrides={"param_groups": {}})
    _, schedule, warmup = lra_models.build_optimizer(cfg, model, steps_per_epoch=10,
                                                     total_steps=350)  # fmt: skip
    assert warmup == 0 and float(schedule(0)) == pytest.approx(4e-3)  # IMDB: warmup_end=0
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        lra_models.build_optimizer(cfg, model, steps_per_epoch=0, total_steps=10)


# ---------------------------------------------------------------------------------------
# Groups on real models.
# ---------------------------------------------------------------------------------------


def _data(kind, paired=False):
    rng = np.random.default_rng(0)
    high = 256 if kind == "pixels" else 17
    seqs = [rng.integers(1, high, 12) for _ in range(4)]
    split = Split(Ragged.from_lists(seqs), np.zeros(4, np.int32),
                  Ragged.from_lists(seqs) if paired else None)  # fmt: skip
    return TaskData("t", split, split, split, 2, kind, max_len=12,
                    vocab_size=17 if kind == "tokens" else None, paired=paired)  # fmt: skip


TINY = {"n_layers": 1, "d_model": 4}
TINY_MIXER = {"s4": {"d_state": 2}, "s4d": {"d_state": 2}, "s4-ptd": {"d_state": 2},
              "s5": {"d_state": 4, "blocks": 1}, "s5-ptd": {"d_state": 4, "blocks": 1}}  # fmt: skip


@pytest.mark.parametrize(
    "task, model",
    [("pathfinder", "s4"), ("listops", "s4d"), ("image", "s4-ptd"), ("pathx", "s5"),
     ("text", "s5-ptd")],
)  # fmt: skip
def test_optimizer_moves_each_parameter_by_its_group(task, model):
    """One update of the real optimiser on a tiny model: with zero gradients only decayed
    parameters move, by ``-lr·wd·p`` of their group; with unit gradients Adam's first step
    moves every entry by the group's learning rate (here at the peak: schedule_steps long,
    warmup 0)."""
    cfg = make_config(task, model, overrides={
        **TINY, "mixer": {**make_config(task, model).mixer, **TINY_MIXER[model]},
        "warmup_steps": 0, "warmup_epochs": 0.0, "schedule": "cosine", "schedule_steps": 1000,
    })  # fmt: skip
    kind = "tokens" if task in ("listops", "text", "retrieval") else "pixels"
    model_ = lra_models.build_model(cfg, _data(kind), rngs=nnx.Rngs(0))
    tx, _, _ = lra_models.build_optimizer(cfg, model_, steps_per_epoch=10, total_steps=1000)
    params = nnx.as_pure(nnx.state(model_, nnx.Param))
    state = tx.init(params)
    update = jax.jit(tx.update)
    decay_only, _ = update(jax.tree.map(jnp.zeros_like, params), state, params)
    unit, _ = update(jax.tree.map(jnp.ones_like, params), state, params)
    flat_p = dict(nnx.to_flat_state(params))
    flat_d = dict(nnx.to_flat_state(decay_only))
    flat_u = dict(nnx.to_flat_state(unit))
    checked = set()
    for path, p in flat_p.items():
        name = str(path[-1])
        if "mixer" in map(str, path) and name in cfg.param_groups:
            lr, wd = effective(cfg, name)
            checked.add(name)
        elif cfg.no_decay and (name == "bias" or "norm" in map(str, path) or name == "embedding"):
            lr, wd = cfg.lr, 0.0
        else:
            lr, wd = cfg.lr, cfg.weight_decay
        p = np.asarray(p, np.float64)
        np.testing.assert_allclose(flat_d[path], -lr * wd * p, rtol=1e-5, atol=1e-12)
        # AdamW: -lr·(m̂ / (√v̂ + ε) + wd·p) with m̂ = √v̂ = 1.
        np.testing.assert_allclose(flat_u[path], -lr * (1 / (1 + 1e-8) + wd * p), rtol=1e-5,
                                   atol=1e-12, err_msg=str(path))  # fmt: skip
    assert checked == set(cfg.param_groups)


def test_build_model_passes_norm_settings():
    mixer = {**make_config("pathx", "s5").mixer, **TINY_MIXER["s5"]}
    cfg = make_config("pathx", "s5", overrides={**TINY, "mixer": mixer})
    model = lra_models.build_model(cfg, _data("pixels"), rngs=nnx.Rngs(0))
    assert model.final_norm is None  # S5's model: no norm after the last block
    assert model.blocks[0].norm.norm.momentum == 0.9  # run_lra_pathx.sh --bn_momentum=0.9
    cfg = make_config("listops", "s5", overrides={**TINY, "mixer": {**make_config(
        "listops", "s5").mixer, **TINY_MIXER["s5"]}})  # fmt: skip
    model = lra_models.build_model(cfg, _data("tokens"), rngs=nnx.Rngs(0))
    assert model.blocks[0].norm.norm.momentum == 0.95  # run_train.py default
    with pytest.raises(ValueError, match="groups names 'Bx' match no parameter inside S5"):
        lra_models.build_optimizer(
            make_config("listops", "s5", overrides={**TINY, "param_groups": {"Bx": "ssm"},
                                                   "mixer": {**cfg.mixer}}),
            model, steps_per_epoch=1, total_steps=2,
        )  # fmt: skip
