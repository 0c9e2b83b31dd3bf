"""Step 2 of the robustness study: train S4D and S4-PTD, evaluate with Fourier-mode noise.

**Task: delayed pattern recall.** Each sequence starts with one of ``K`` fixed random ±1
codes of length ``m`` and continues with Gaussian noise to length ``L``; the whole sequence
also carries noise of standard deviation ``σ``. The class is the code, read out at the last
position (``pooling="last"``), so the model must carry ``m`` samples of information across
``L − m`` steps of distractors: a long-range memory task, the job HiPPO initialisations were
designed for, generated offline in milliseconds, and learnable by a small model in a few
hundred CPU steps. It is also free of high-frequency content the model needs, so a model
that reacts strongly to a high-frequency perturbation does so through its state matrix, not
through the data.

**Models.** :class:`ssmix.blocks.SequenceModel` (linear encoder, pre-norm residual blocks with
a GLU, last-position pooling) around SSM layers of the same size, trained with the grouped
optimiser of :mod:`ssmix.optim` (SSM parameters at their own learning rate, no weight decay):

- ``"s4d"``: S4D-LegS as ssmix (and the S4 code) initialises it, ``B = V*b`` with its
  imaginary part clipped to ``[−2, 2]``;
- ``"s4d_exact_b"``: S4D-LegS with the exact ``B = V*b`` (no clip), the diagonal system whose
  transfer function step 1 analyses;
- ``"s4_ptd"``: S4-PTD (:func:`ssmix.layers.S4PTD`).

**Noise.** Every SSM layer's input gets ``a·cos(ω·Δ_h·ℓ)`` at position ``ℓ`` and feature
``h``, with ``Δ_h`` that layer's (trained) step and ``a = 0.1·U[0, 1)`` drawn per sequence
and layer (PTD, Yu et al. 2024): in each feature's own time units the input oscillates at the
continuous frequency ω. The frequencies are S4D's spikes from step 1
(:mod:`experiments.robustness.transfer`), plus a control frequency away from them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ssmix import hippo
from ssmix.blocks import SequenceModel
from ssmix.layers import S4D, S4PTD
from ssmix.optim import make_optimizer

__all__ = [
    "MODELS",
    "FourierNoise",
    "NoiseSetting",
    "TaskConfig",
    "TrainConfig",
    "evaluator",
    "layer_gain",
    "make_task",
    "run",
]

#: The models compared (see the module docstring).
MODELS = ("s4d", "s4d_exact_b", "s4_ptd")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Delayed pattern recall: ``K`` codes of length ``m`` at the start of ``L`` steps."""

    length: int = 256
    n_classes: int = 4
    code_length: int = 32
    sigma: float = 0.3
    n_train: int = 8192
    n_test: int = 1024
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model size and optimisation (the same for both models)."""

    d_model: int = 32
    d_state: int = 64
    n_layers: int = 2
    batch_size: int = 32
    steps: int = 400
    lr: float = 1e-2
    ssm_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0


def make_task(cfg: TaskConfig, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples: inputs ``(n, L, 1)`` float32 and labels ``(n,)`` int32.

    The codebook depends on ``cfg.seed`` only, so train and test sets drawn with different
    ``seed`` share it.
    """
    codes = np.random.default_rng(cfg.seed).choice([-1.0, 1.0], (cfg.n_classes, cfg.code_length))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, cfg.n_classes, n)
    x = cfg.sigma * rng.normal(size=(n, cfg.length))
    x[:, : cfg.code_length] += codes[y]
    return x[..., None].astype(np.float32), y.astype(np.int32)


class NoiseSetting(nnx.Variable):
    """Settings of :class:`FourierNoise` (not trained, not saved as parameters)."""


class FourierNoise(nnx.Module):
    """Wrap an S4D layer and add ``a·cos(ω·Δ_h·ℓ)`` to its input ``(B, L, H)``.

    ``omega`` (scalar) and ``scale`` (scalar, 0 = off) are :class:`NoiseSetting` variables;
    ``a = scale·U[0, 1)`` per sequence, drawn from ``key`` (a raw PRNG key). ``Δ_h`` is read
    from the wrapped layer's ``log_dt`` (S4D and S4-PTD both have one step per feature).
    """

    def __init__(self, inner: S4D):
        self.inner = inner
        self.omega = NoiseSetting(jnp.zeros((), jnp.float32))
        self.scale = NoiseSetting(jnp.zeros((), jnp.float32))
        self.key = NoiseSetting(jax.random.key_data(jax.random.key(0)))

    def __call__(self, x, mask=None):
        """``inner(x + noise, mask)`` for ``x (B, L, H)``."""
        Bsz, L, _ = x.shape
        dt = jnp.exp(self.inner.log_dt[...]).astype(jnp.float32)  # (H,)
        key = jax.random.wrap_key_data(self.key[...])
        amp = self.scale[...] * jax.random.uniform(key, (Bsz, 1, 1))
        phase = self.omega[...] * dt[None, None, :] * jnp.arange(L, dtype=jnp.float32)[:, None]
        return self.inner(x + (amp * jnp.cos(phase)).astype(x.dtype), mask)


def make_layer(model: str, d_model: int, d_state: int, *, rngs: nnx.Rngs) -> S4D:
    """One SSM layer of ``model`` (one of :data:`MODELS`)."""
    if model == "s4_ptd":
        return S4PTD(d_model, d_state, rngs=rngs)
    layer = S4D(d_model, d_state, init="legs", rngs=rngs)
    if model == "s4d_exact_b":
        B = np.broadcast_to(hippo.nplr("legs", d_state).B, (d_model, d_state // 2))
        layer.B[...] = jnp.asarray(np.stack([B.real, B.imag], axis=-1), layer.B[...].dtype)
    return layer


def build_model(model: str, task: TaskConfig, cfg: TrainConfig) -> SequenceModel:
    """A :class:`SequenceModel` whose mixers are ``FourierNoise(make_layer(model, ...))``."""

    def mixer(d_model, *, rngs):
        return FourierNoise(make_layer(model, d_model, cfg.d_state, rngs=rngs))

    return SequenceModel(
        mixer,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_classes=task.n_classes,
        d_input=1,
        pooling="last",
        norm="layer",
        prenorm=True,
        glu="full",
        rngs=nnx.Rngs(cfg.seed),
    )


def layer_gain(layer: S4D, omega: float, length: int) -> tuple[float, float]:
    """Median and maximum over features of the SSM's gain for the input ``cos(ω Δ_h ℓ)``.

    The gain is the RMS of the output without the skip term ``D·u`` over the RMS of the
    input, both over the second half of ``length`` steps (past the transient).
    """
    dt = jnp.exp(layer.log_dt[...])
    x = jnp.cos(omega * dt[None, None, :] * jnp.arange(length)[None, :, None])
    y = layer(x) - layer.D[...][0] * x
    half = slice(length // 2, None)
    gain = jnp.std(y[0, half], axis=0) / jnp.std(x[0, half], axis=0)
    return float(jnp.median(gain)), float(jnp.max(gain))


def _set_noise(model: SequenceModel, omega, scale, key) -> None:
    """Point every layer's noise at ``omega`` with amplitude ``scale·U[0,1)`` (own keys)."""
    for i, block in enumerate(model.blocks):
        block.mixer.omega[...] = jnp.asarray(omega, jnp.float32)
        block.mixer.scale[...] = jnp.asarray(scale, jnp.float32)
        block.mixer.key[...] = jax.random.key_data(jax.random.fold_in(key, i))


def train(model: SequenceModel, cfg: TrainConfig, data) -> tuple[SequenceModel, dict]:
    """Train ``model`` on ``data = (x, y)``; return the trained model and a summary."""
    x_train, y_train = data
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))
    tx = make_optimizer(
        model,
        lr=cfg.lr,
        ssm_lr=cfg.ssm_lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=warmup,
        total_steps=cfg.steps,
    )
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            logits = nnx.merge(graph, p, rest)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    losses = []
    for i in range(cfg.steps):
        idx = rng.integers(0, len(y_train), cfg.batch_size)
        params, opt, loss = step(params, opt, x_train[idx], y_train[idx])
        losses.append(float(loss))
        if (i + 1) % 100 == 0:
            log.info("step %d: loss %.4f", i + 1, np.mean(losses[-100:]))
    tail = losses[-max(1, cfg.steps // 10) :]
    info = {"seconds": time.perf_counter() - start, "final_loss": float(np.mean(tail))}
    return nnx.merge(graph, params, rest), info


def evaluator(model: SequenceModel):
    """``evaluate(data, omega, scale, seed) -> accuracy`` for ``model`` (compiled once).

    The noise is ``scale·U[0,1)·cos(ω Δ_h ℓ)`` at every SSM layer's input (``scale = 0``:
    clean); ``seed`` draws the amplitudes.
    """
    graph, state = nnx.split(model)

    @jax.jit
    def correct(state, x, y, key, omega, scale):
        m = nnx.merge(graph, state)
        _set_noise(m, omega, scale, key)
        return jnp.sum(jnp.argmax(m(x), axis=-1) == y)

    def evaluate(data, omega: float, scale: float, seed: int) -> float:
        x, y = data
        hits, batch = 0, 256
        for j, i in enumerate(range(0, len(y), batch)):
            key = jax.random.fold_in(jax.random.key(seed), j)
            hits += int(correct(state, x[i : i + batch], y[i : i + batch], key, omega, scale))
        return hits / len(y)

    return evaluate


def run(
    spikes: list[float],
    control: float,
    task: TaskConfig = TaskConfig(),
    cfg: TrainConfig = TrainConfig(),
    *,
    amplitudes: tuple[float, ...] = (0.1, 1.0),
    models: tuple[str, ...] = MODELS,
) -> dict:
    """Train one model per entry of ``models`` and evaluate clean and noisy accuracy.

    Args:
      spikes: noise frequencies ω (S4D's spikes from step 1).
      control: a frequency away from the spikes, evaluated the same way.
      task, cfg: the task and the training configuration.
      amplitudes: noise scales ``s`` (``a = s·U[0, 1)``): 0.1 is the study's, larger ones
        are stress tests.
      models: entries of :data:`MODELS`.

    Returns:
      JSON-ready dict with the configurations and, per model, the training summary, the
      clean accuracy, the noisy accuracies ``noisy[str(s)][frequency name]`` and the first
      layer's gain at each frequency (:func:`layer_gain`, median and maximum over features).
    """
    train_data = make_task(task, task.n_train, seed=task.seed + 1)
    test_data = make_task(task, task.n_test, seed=task.seed + 2)
    freqs = {f"spike_{i + 1}": float(w) for i, w in enumerate(spikes)}
    freqs["control"] = float(control)
    results = {}
    for name in models:
        model, info = train(build_model(name, task, cfg), cfg, train_data)
        evaluate = evaluator(model)
        clean = evaluate(test_data, 0.0, 0.0, seed=0)
        noisy = {
            str(s): {k: evaluate(test_data, w, s, seed=1) for k, w in freqs.items()}
            for s in amplitudes
        }
        first = model.blocks[0].mixer.inner
        gain = {k: layer_gain(first, w, task.length) for k, w in freqs.items()}
        log.info("%s: clean %.3f, noisy %s", name, clean, noisy)
        results[name] = {"train": info, "clean": clean, "noisy": noisy, "first_layer_gain": gain}
    return {
        "task": dataclasses.asdict(task),
        "train": dataclasses.asdict(cfg),
        "amplitudes": list(amplitudes),
        "frequencies": freqs,
        "models": results,
    }
