"""One prepared device benchmark: forward + backward of every layer default and kernel form.

Times the gradient (forward + backward, median of ``--repeats`` runs after one warm-up call,
``jax.block_until_ready``) of

- each layer's default configuration (S4, S4D, S5, S5 bidirectional, Hydra, Attention; the
  constructors of :func:`benchmarks.accelerator.layer_cases`), gradient of ``Σ y²`` with
  respect to the parameters and the input ``(B, L, H)``;
- each kernel form: :func:`ssmix.kernels.scan.linear_scan` (sequential, chunked,
  associative, parallel and pallas) on a complex state with a constant decay (the S5 scan);
  :func:`ssmix.kernels.ssd.ssd` and :func:`~ssmix.kernels.ssd.quasiseparable` (chunked,
  parallel, pallas; sequential only at L ≤ 1k); S4's power kernel
  :func:`ssmix.kernels.cauchy.dplr_power_kernel` with its rows by ``scan`` and by
  ``doubling``. ``pallas`` rows appear only when the installed ssmix accepts
  ``method="pallas"`` (probed with a tiny abstract call);
- anchors in the same process: a pure-JAX S5 layer written the way lindermanlab/S5 writes it
  (ZOH discretisation, a binary operator on ``(Λ̄, B̄u)`` pairs under
  ``jax.lax.associative_scan``, ``vmap`` over the batch), and — only with
  ``--mamba-src PATH`` pointing at a checkout of state-spaces/mamba (the folder holding
  ``mamba_ssm/``, kept in an ignored folder such as ``runs/mamba``) and torch + triton +
  einops importable — mamba's Triton ``mamba_chunk_scan_combined`` (chunk 256, CUDA only)
  and its torch ``ssd_minimal_discrete`` (chunk 64) on the same SSD shapes, timed with
  ``torch.cuda.synchronize``. ``mamba_ssm/__init__.py`` (which needs the compiled CUDA
  extensions) is bypassed: only the pure Triton / torch files are imported.

at L = 1k, 4k, 16k and 64k (``--lengths``), with B and H fixed and printed: B = 4
(``--batch``); layers H = 128 (``--features``); linear_scan a complex state of 256;
ssd / quasiseparable 8 heads, head dim 64, state 64, one group; the S4 power kernel 256
features, N = 64 (LegS). All float32. The table has one
row per form and one column per length; a cell is milliseconds, followed by the ratio to the
row's anchor at that length (this time / anchor time: below 1× is faster than the anchor) —
ssmix S5 against the S5 anchor, the ssmix SSD forms against mamba's Triton kernel. A cell
that was not run says why (``OOM``, a time projection over the per-row limit, the time
budget, an error) and the reasons are listed under the table.

Guards, so the whole run fits in 8 minutes on one H100: lengths run shortest first for every
row; a row whose compiled plan exceeds the device memory is skipped as ``OOM``; a row whose
previous length took so long that the projected call (linear in L, quadratic for Attention)
exceeds ``--row-seconds`` (6) is skipped; repeats shrink so one row's calls stay within
``--row-seconds``; after ``--max-seconds`` (400) every remaining row is skipped. (Not yet
run on a GPU: the budget is an estimate, about 94 compiled programs; every record holds its
compile time, so a first run shows where the time went.)

``--only`` picks rows (``"group: form"`` as in the table, or a whole group). The
``"auto"`` forms resolve from ``jax.default_backend()`` (:func:`ssmix.auto_backend`), so
on a GPU the layer defaults are the accelerator forms; ``--rules cpu|gpu|tpu`` forces one
backend's rules. ``XLA_PYTHON_CLIENT_PREALLOCATE`` defaults to ``false`` here (set before
jax is imported when run as a script) so that torch can share the GPU with JAX.

Run on the device machine from the repository root::

    PYTHONPATH=. python benchmarks/device.py [--mamba-src runs/mamba] [--json runs/device.json]

The device machine reaches nothing outside, so the mamba checkout travels with the tree:
e.g. ``git archive`` state-spaces/mamba's ``mamba_ssm/`` into ``runs/mamba`` (git-ignored)
and name that folder among the paths carried to the machine.

(``--small``: tiny shapes and lengths for a CPU smoke run, tested in
``tests/test_device_benchmark.py``.)
JSON (default ``runs/device-<time>.json``, git-ignored): device, versions, shapes and one
record per (row, length) with the median seconds, repeats, compile seconds, planned MiB and
the reason for a skipped cell.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssmix  # noqa: E402
from benchmarks.accelerator import layer_cases  # noqa: E402
from benchmarks.common import memory_mb, print_table  # noqa: E402
from ssmix import hippo, layers  # noqa: E402
from ssmix.kernels import cauchy  # noqa: E402
from ssmix.kernels import ssd as ssd_mod  # noqa: E402
from ssmix.kernels.scan import linear_scan  # noqa: E402

LENGTHS = (1024, 4096, 16384, 65536)
SMALL_LENGTHS = (32, 64)
#: The layers timed (names of :func:`benchmarks.accelerator.layer_cases`).
LAYERS = ("S4", "S4D", "S5", "S5 bidirectional", "Hydra", "Attention")
SCAN_FORMS = ("sequential", "chunked", "associative", "parallel", "pallas")
SSD_FORMS = ("chunked", "parallel", "pallas", "sequential")
#: Sequential SSD / quasiseparable forms only up to this length (one loop step per position).
SSD_SEQUENTIAL_MAX = 1024
POWER_FORMS = ("scan", "doubling")
S5_ANCHOR = "S5 (lindermanlab-style)"
S5_BIDIR_ANCHOR = "S5 bidirectional (lindermanlab-style)"
MAMBA_TRITON = "mamba_chunk_scan_combined"
MAMBA_MINIMAL = "ssd_minimal_discrete"


class Skip(Exception):
    """A cell that is not run, with the reason."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    B: int  # batch of every row
    H: int  # layer features
    S: int  # linear_scan state width (complex)
    heads: int  # SSD heads
    P: int  # SSD head dim
    N: int  # SSD state / S4 state size
    S4_H: int  # S4 power kernel features

    def describe(self) -> str:
        return (
            f"B={self.B}; layers: H={self.H}; linear_scan: complex state S={self.S}, constant "
            f"decay; ssd/quasiseparable: heads={self.heads}, P={self.P}, N={self.N}, groups=1; "
            f"S4 power kernel: H={self.S4_H}, N={self.N} (LegS)"
        )


@dataclasses.dataclass
class Case:
    """One table row. ``build(L)`` returns ``(fn, args)`` for a JAX row (``fn`` is jitted and
    timed as ``fn(*args)``) or a zero-argument ``step`` for a torch row (``torch=True``)."""

    group: str
    name: str
    build: Callable[[int], Any]
    anchor: str | None = None
    max_length: int | None = None
    power: float = 1.0  # call time ~ L**power, to project the next length
    torch: bool = False

    @property
    def key(self) -> str:
        return f"{self.group}: {self.name}"


# ------------------------------------------------------------------------------------------
# Timing


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory"))


def _device_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    return None if not stats else stats.get("bytes_limit")


def _repeats(first: float, repeats: int, row_seconds: float) -> int:
    """Runs after the warm-up so that one row's calls stay within ``row_seconds``."""
    return max(1, min(repeats, int((row_seconds - first) / max(first, 1e-9))))


def time_jax(fn, args, repeats: int, row_seconds: float, device_bytes: int | None) -> dict:
    start = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    mib = memory_mb(exe)
    if device_bytes and math.isfinite(mib) and mib * 2**20 > device_bytes:
        raise Skip(f"OOM: plans {mib / 1024:.1f} GiB > device {device_bytes / 2**30:.1f} GiB")
    start = time.perf_counter()
    jax.block_until_ready(exe(*args))  # warm-up
    first = time.perf_counter() - start
    times = []
    for _ in range(_repeats(first, repeats, row_seconds)):
        start = time.perf_counter()
        jax.block_until_ready(exe(*args))
        times.append(time.perf_counter() - start)
    return dict(
        seconds=statistics.median(times), repeats=len(times), compile_seconds=compile_s, mib=mib
    )


def time_torch(step, repeats: int, row_seconds: float) -> dict:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    start = time.perf_counter()
    step()  # warm-up: Triton compiles and autotunes here
    sync()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(_repeats(first, repeats, row_seconds)):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return dict(
        seconds=statistics.median(times),
        repeats=len(times),
        compile_seconds=compile_s,
        mib=float("nan"),
    )


# ------------------------------------------------------------------------------------------
# Rows: layers and the S5 anchor


@functools.lru_cache(maxsize=1)
def _layer_input(shapes: Shapes, L: int) -> jax.Array:
    """The ``(B, L, H)`` input of the layer rows (cached: every layer row at ``L`` shares it)."""
    return jnp.asarray(_normal(1, (shapes.B, L, shapes.H)))


def _normal(seed: int, shape) -> np.ndarray:
    """Standard normal float32 from NumPy (eager jax.random would compile per shape)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _layer_case(name: str, make_for_length, shapes: Shapes, anchor: str | None) -> Case:
    def build(L):
        graphdef, state = nnx.split(make_for_length(L)())

        def loss(state, x):
            y = nnx.merge(graphdef, state)(x)
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        return jax.grad(loss, argnums=(0, 1)), (state, _layer_input(shapes, L))

    return Case("layer", name, build, anchor=anchor, power=2.0 if name == "Attention" else 1.0)


def s5_anchor_params(layer) -> dict:
    """lindermanlab/S5's parameter layout filled from an ssmix :class:`~ssmix.layers.S5`
    (same modes, ``B̃``, ``C̃``, ``D`` and steps, so the two compute the same layer):
    ``Lambda_re/im (P,)``, ``B (P, H, 2)`` and ``C (H, n·P, 2)`` as real/imaginary pairs,
    ``D (H,)``, ``log_step (P, 1)`` (ZOH, ``step_rescale`` 1, no eigenvalue clipping)."""
    if layer.disc != "zoh" or layer.step_rescale != 1.0 or layer.clip_eigs or not layer.conj_sym:
        raise ValueError("the anchor mirrors the default S5: zoh, conj_sym, no rescale or clip")
    return {
        "Lambda_re": layer.Lambda_re[...],
        "Lambda_im": layer.Lambda_im[...],
        "B": layer.B[...],
        "C": layer.C[...],
        "D": layer.D[...],
        "log_step": layer.log_step[...][:, None],
    }


def s5_anchor_apply(params: dict, u: jax.Array, bidirectional: bool) -> jax.Array:
    """The S5 layer as lindermanlab/S5 writes it (``s5/ssm.py``): ZOH, then
    ``apply_ssm`` on one sequence ``(L, H)`` with a binary operator on ``(Λ̄, B̄u)`` pairs under
    ``jax.lax.associative_scan``, ``2·Re(C̃ x)`` (conjugate symmetry) plus ``D ⊙ u``;
    ``vmap`` over the batch. Written here from that description (no code copied)."""
    Lambda = params["Lambda_re"] + 1j * params["Lambda_im"]
    B_tilde = params["B"][..., 0] + 1j * params["B"][..., 1]
    C_tilde = params["C"][..., 0] + 1j * params["C"][..., 1]
    step = jnp.exp(params["log_step"][:, 0])
    Lambda_bar = jnp.exp(Lambda * step)
    B_bar = (1 / Lambda * (Lambda_bar - 1.0))[..., None] * B_tilde

    @jax.vmap
    def binary_operator(q_i, q_j):
        A_i, b_i = q_i
        A_j, b_j = q_j
        return A_j * A_i, A_j * b_i + b_j

    def apply_ssm(u_seq):
        Lambda_elements = Lambda_bar * jnp.ones((u_seq.shape[0], Lambda_bar.shape[0]))
        Bu_elements = jax.vmap(lambda u_t: B_bar @ u_t)(u_seq)
        _, xs = jax.lax.associative_scan(binary_operator, (Lambda_elements, Bu_elements))
        if bidirectional:
            _, xs2 = jax.lax.associative_scan(
                binary_operator, (Lambda_elements, Bu_elements), reverse=True
            )
            xs = jnp.concatenate((xs, xs2), axis=-1)
        ys = jax.vmap(lambda x: 2 * (C_tilde @ x).real)(xs)
        return ys + jax.vmap(lambda u_t: params["D"] * u_t)(u_seq)

    return jax.vmap(apply_ssm)(u)


def _s5_anchor_case(name: str, shapes: Shapes, bidirectional: bool) -> Case:
    def build(L):
        layer = layers.S5(shapes.H, bidirectional=bidirectional, rngs=nnx.Rngs(0))
        params = s5_anchor_params(layer)

        def loss(params, x):
            return jnp.sum(jnp.square(s5_anchor_apply(params, x, bidirectional)))

        return jax.grad(loss, argnums=(0, 1)), (params, _layer_input(shapes, L))

    return Case("anchor", name, build)


# ------------------------------------------------------------------------------------------
# Rows: kernels


@functools.lru_cache(maxsize=1)
def _scan_inputs(shapes: Shapes, L: int):
    S = shapes.S
    a = np.exp(0.01 * (-0.5 - 1j * np.pi * np.arange(S) / S)).astype(np.complex64)
    b = _normal(2, (shapes.B, L, S)) + 1j * _normal(3, (shapes.B, L, S))
    return jnp.asarray(a), jnp.asarray(b, jnp.complex64)


def _scan_case(form: str, shapes: Shapes) -> Case:
    def build(L):
        def loss(a, b):
            states, _ = linear_scan(a, b, method=form)
            return jnp.sum(states.real * states.imag)

        return jax.grad(loss, argnums=(0, 1)), _scan_inputs(shapes, L)

    return Case("linear_scan", form, build)


@functools.lru_cache(maxsize=1)
def _ssd_inputs(shapes: Shapes, L: int, qs: bool):
    b, h, P, N = shapes.B, shapes.heads, shapes.P, shapes.N
    rng = np.random.default_rng(4)
    x = _normal(5, (b, L, h, P))
    dt = rng.uniform(1e-3, 0.1, (b, L, h)).astype(np.float32)
    A = -np.exp(rng.uniform(0, np.log(16.0), h)).astype(np.float32)
    Bm = _normal(6, (b, L, 1, N)) / np.float32(N**0.5)
    Cm = _normal(7, (b, L, 1, N)) / np.float32(N**0.5)
    if not qs:
        return tuple(jnp.asarray(v) for v in (x, dt, A, Bm, Cm))
    dt_bw = rng.uniform(1e-3, 0.1, (b, L, h)).astype(np.float32)
    diag = _normal(8, (b, L, h))
    args = (x, dt, dt_bw, A, Bm, Cm, Cm * 0.5, Bm * 0.5, diag)
    return tuple(jnp.asarray(v) for v in args)


def _ssd_case(form: str, shapes: Shapes, qs: bool) -> Case:
    def build(L):
        args = _ssd_inputs(shapes, L, qs)
        if qs:

            def loss(*args):
                return jnp.sum(jnp.square(ssd_mod.quasiseparable(*args, method=form)))
        else:

            def loss(*args):
                y, final = ssd_mod.ssd(*args, method=form)
                return jnp.sum(jnp.square(y)) + jnp.sum(final)

        return jax.grad(loss, argnums=tuple(range(len(args)))), args

    max_length = SSD_SEQUENTIAL_MAX if form == "sequential" else None
    anchor = None if qs else MAMBA_TRITON
    group = "quasiseparable" if qs else "ssd"
    return Case(group, form, build, anchor=anchor, max_length=max_length)


def _power_inputs(shapes: Shapes):
    form = hippo.nplr("legs", shapes.N, 1, b_clip=hippo.S4_B_CLIP)
    H, N2 = shapes.S4_H, shapes.N // 2
    rng = np.random.default_rng(0)
    lam = np.minimum(form.Lambda.real, -1e-4) + 1j * form.Lambda.imag
    Lam = jnp.asarray(np.broadcast_to(lam, (H, N2)), jnp.complex64)
    P = jnp.asarray(np.broadcast_to(form.P[:, None, :], (1, H, N2)), jnp.complex64)
    B = jnp.asarray(np.broadcast_to(form.B, (H, N2)), jnp.complex64)
    C = jnp.asarray(rng.normal(size=(H, N2)) + 1j * rng.normal(size=(H, N2)), jnp.complex64)
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), H)), jnp.float32)
    return Lam, P, B, C, dt


def _power_case(form: str, shapes: Shapes) -> Case:
    def build(L):
        def loss(*args):
            return jnp.sum(jnp.square(cauchy.dplr_power_kernel(*args, L, method=form)))

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4)), _power_inputs(shapes)

    return Case("S4 power kernel", form, build)


def pallas_support(shapes: Shapes) -> dict[str, str | None]:
    """For ``linear_scan``, ``ssd`` and ``quasiseparable``: None when ``method="pallas"`` is
    accepted (a tiny abstract call, nothing runs), else the reason."""
    tiny = dataclasses.replace(shapes, B=1, S=4, heads=2, P=4, N=4)
    probes = {
        "linear_scan": lambda: linear_scan(*_scan_inputs(tiny, 8), method="pallas"),
        "ssd": lambda: ssd_mod.ssd(*_ssd_inputs(tiny, 8, False), method="pallas"),
        "quasiseparable": lambda: ssd_mod.quasiseparable(
            *_ssd_inputs(tiny, 8, True), method="pallas"
        ),
    }
    out: dict[str, str | None] = {}
    for name, probe in probes.items():
        try:
            jax.eval_shape(probe)
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - any refusal means no pallas row
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return out


# ------------------------------------------------------------------------------------------
# Rows: mamba (torch)


def load_mamba(src: str):
    """``(mamba_chunk_scan_combined, ssd_minimal_discrete)`` from a state-spaces/mamba
    checkout at ``src`` (the folder holding ``mamba_ssm/``, or that package folder itself),
    without running ``mamba_ssm/__init__.py`` (it imports the compiled CUDA extensions)."""
    root = Path(src).resolve()
    pkg_dir = root / "mamba_ssm" if (root / "mamba_ssm").is_dir() else root
    if not (pkg_dir / "ops" / "triton" / "ssd_combined.py").is_file():
        raise FileNotFoundError(f"no mamba_ssm/ops/triton/ssd_combined.py under {root}")
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [str(pkg_dir)]
        sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined, ssd_minimal_discrete


def _torch_ssd_inputs(shapes: Shapes, L: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(3)
    b, h, P, N = shapes.B, shapes.heads, shapes.P, shapes.N

    def leaf(t):
        return t.requires_grad_(True)

    x = leaf(torch.randn(b, L, h, P, device=device, generator=g))
    dt = leaf(torch.rand(b, L, h, device=device, generator=g) * (0.1 - 1e-3) + 1e-3)
    A = leaf(-torch.exp(torch.rand(h, device=device, generator=g) * math.log(16.0)))
    Bm = leaf(torch.randn(b, L, 1, N, device=device, generator=g) / N**0.5)
    Cm = leaf(torch.randn(b, L, 1, N, device=device, generator=g) / N**0.5)
    return x, dt, A, Bm, Cm


def _mamba_cases(src: str, shapes: Shapes) -> tuple[list[Case], dict[str, str]]:
    """The mamba rows, or the reason each is absent."""
    try:
        import torch

        chunk_scan, minimal = load_mamba(src)
    except Exception as exc:  # noqa: BLE001 - report and go on without the anchor
        reason = f"mamba not importable: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        return [], {MAMBA_TRITON: reason, MAMBA_MINIMAL: reason}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases, missing = [], {}

    def triton_build(L):
        x, dt, A, Bm, Cm = _torch_ssd_inputs(shapes, L, device)

        def step():
            y, final = chunk_scan(x, dt, A, Bm, Cm, chunk_size=256, return_final_states=True)
            (y.square().sum() + final.sum()).backward()

        return step

    def minimal_build(L):
        if L % 64:
            raise Skip(f"ssd_minimal_discrete needs L divisible by its chunk 64; L={L}")
        x, dt, A, Bm, Cm = _torch_ssd_inputs(shapes, L, device)

        def step():
            h = shapes.heads
            y, final = minimal(
                x * dt[..., None], A * dt, Bm.expand(-1, -1, h, -1), Cm.expand(-1, -1, h, -1), 64
            )
            (y.square().sum() + final.sum()).backward()

        return step

    if device == "cuda":
        cases.append(Case("mamba (Triton)", MAMBA_TRITON, triton_build, torch=True))
    else:
        missing[MAMBA_TRITON] = "Triton kernel needs CUDA (torch.cuda.is_available() is False)"
    cases.append(Case("mamba (torch)", MAMBA_MINIMAL, minimal_build, torch=True))
    return cases, missing


# ------------------------------------------------------------------------------------------
# Driver


def build_cases(shapes: Shapes, mamba_src: str | None):
    """All rows in table order, and the notes on rows left out."""
    pallas = pallas_support(shapes)
    notes = {}
    cases: list[Case] = []
    all_layers = lambda L: layer_cases(L, shapes.H)  # noqa: E731
    for name in LAYERS:
        anchor = {"S5": S5_ANCHOR, "S5 bidirectional": S5_BIDIR_ANCHOR}.get(name)
        cases.append(_layer_case(name, lambda L, n=name: all_layers(L)[n], shapes, anchor))
    cases.append(_s5_anchor_case(S5_ANCHOR, shapes, False))
    cases.append(_s5_anchor_case(S5_BIDIR_ANCHOR, shapes, True))
    for form in SCAN_FORMS:
        if form == "pallas" and pallas["linear_scan"]:
            notes["linear_scan: pallas"] = pallas["linear_scan"]
            continue
        cases.append(_scan_case(form, shapes))
    for qs, group in ((False, "ssd"), (True, "quasiseparable")):
        for form in SSD_FORMS:
            if form == "pallas" and pallas[group]:
                notes[f"{group}: pallas"] = pallas[group]
                continue
            cases.append(_ssd_case(form, shapes, qs))
        if mamba_src and not qs:  # the anchors next to the SSD rows
            mamba, missing = _mamba_cases(mamba_src, shapes)
            cases.extend(mamba)
            notes.update({f"mamba: {k}": v for k, v in missing.items()})
    for form in POWER_FORMS:
        cases.append(_power_case(form, shapes))
    return cases, notes


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def run(args) -> dict:
    start = time.perf_counter()
    lengths = tuple(args.lengths or (SMALL_LENGTHS if args.small else LENGTHS))
    if args.small:
        shapes = Shapes(B=2, H=64, S=8, heads=2, P=8, N=8, S4_H=4)
    else:
        shapes = Shapes(B=args.batch, H=args.features, S=256, heads=8, P=64, N=64, S4_H=256)
    rules = contextlib.nullcontext() if args.rules is None else ssmix.auto_backend(args.rules)
    device = jax.devices()[0]
    device_bytes = _device_bytes()
    records: list[dict] = []
    with rules:
        cases, notes = build_cases(shapes, args.mamba_src)
        if args.only:
            cases = [c for c in cases if c.key in args.only or c.group in args.only]
        header = {
            "device": getattr(device, "device_kind", str(device)),
            "platform": device.platform,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "rules": ssmix.auto_backend(),
            "shapes": dataclasses.asdict(shapes),
            "lengths": list(lengths),
            "repeats": args.repeats,
            "row_seconds": args.row_seconds,
            "max_seconds": args.max_seconds,
            "notes": notes,
        }
        print(
            f"device: {header['device']} ({device.platform}), jax {jax.__version__}, "
            f"auto rules: {header['rules']}",
            flush=True,
        )
        print(f"shapes: {shapes.describe()}; L in {list(lengths)}", flush=True)
        last: dict[str, tuple[int, float]] = {}
        failed: dict[str, str] = {}
        for L in lengths:
            for case in cases:
                rec = {"group": case.group, "name": case.name, "L": L, "anchor": case.anchor}
                try:
                    if time.perf_counter() - start > args.max_seconds:
                        raise Skip(f"time budget of {args.max_seconds:.0f} s spent")
                    if case.max_length is not None and L > case.max_length:
                        raise Skip(f"run only up to L={case.max_length}")
                    if case.key in failed:
                        raise Skip(f"{failed[case.key]} at a shorter length")
                    if case.key in last:
                        L0, t0 = last[case.key]
                        projected = t0 * (L / L0) ** case.power
                        if projected > args.row_seconds:
                            raise Skip(
                                f"projected {projected:.1f} s per call > {args.row_seconds} s"
                            )
                    built = case.build(L)
                    if case.torch:
                        rec.update(time_torch(built, args.repeats, args.row_seconds))
                    else:
                        fn, fargs = built
                        rec.update(
                            time_jax(fn, fargs, args.repeats, args.row_seconds, device_bytes)
                        )
                    last[case.key] = (L, rec["seconds"])
                except Skip as exc:
                    rec["skipped"] = str(exc)
                    if str(exc).startswith("OOM"):
                        failed[case.key] = "OOM"
                except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                    if _is_oom(exc):
                        rec["skipped"] = "OOM"
                        failed[case.key] = "OOM"
                    else:
                        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                        rec["skipped"] = f"error: {type(exc).__name__}: {msg}"
                        failed[case.key] = "error"
                    _free_torch()
                records.append(rec)
                status = rec.get("skipped") or (
                    f"{rec['seconds'] * 1e3:.2f} ms x{rec['repeats']}, "
                    f"compile {rec['compile_seconds']:.1f} s"
                )
                elapsed = time.perf_counter() - start
                line = f"  [{elapsed:4.0f} s] L={L} {case.key}: {status}"
                print(line, file=sys.stderr, flush=True)
                gc.collect()
    header["total_seconds"] = time.perf_counter() - start
    header["records"] = records
    _print_results(header, cases, lengths, records)
    return header


def _free_torch() -> None:
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _print_results(header, cases, lengths, records) -> None:
    by_key = {(r["group"], r["name"], r["L"]): r for r in records}
    anchors = {c.name: c.group for c in cases}
    headers = ["group", "form", *(f"L={L} ms" for L in lengths), "ratio to"]
    rows, reasons = [], []
    for case in cases:
        cells = []
        for L in lengths:
            rec = by_key[(case.group, case.name, L)]
            if "skipped" in rec:
                if rec["skipped"] not in reasons:
                    reasons.append(rec["skipped"])
                cells.append(f"skip [{reasons.index(rec['skipped']) + 1}]")
                continue
            cell = _fmt_ms(rec["seconds"])
            base = by_key.get((anchors.get(case.anchor), case.anchor, L), {})
            if "seconds" in base:
                rec["ratio_to_anchor"] = rec["seconds"] / base["seconds"]
                cell += f" ({rec['ratio_to_anchor']:.2f}×)"
            cells.append(cell)
        anchor = case.anchor if case.anchor in anchors else ""
        rows.append([case.group, case.name, *cells, anchor])
    print(
        f"\nforward + backward, median of up to {header['repeats']} runs after a warm-up; "
        f"{header['device']} ({header['platform']}), jax {header['jax']}, "
        f"auto rules: {header['rules']}"
    )
    print(f"shapes: {Shapes(**header['shapes']).describe()}")
    print("(×: this time / the anchor's time at the same L; below 1× is faster)\n")
    print_table(headers, rows)
    if reasons:
        print("\nskipped:")
        for i, reason in enumerate(reasons, 1):
            print(f"  [{i}] {reason}")
    for key, note in header["notes"].items():
        print(f"  not run: {key}: {note}")
    print(f"total {header['total_seconds']:.0f} s")


def _finite_or_none(obj):
    """``obj`` with NaN / inf floats replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=4, help="B (not with --small)")
    parser.add_argument("--features", type=int, default=128, help="layer H (not with --small)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--row-seconds", type=float, default=6.0, help="time guard per cell")
    parser.add_argument("--max-seconds", type=float, default=400.0, help="whole-run budget")
    parser.add_argument("--rules", choices=ssmix.BACKENDS, default=None, help="force auto rules")
    parser.add_argument("--mamba-src", default=None, help="state-spaces/mamba checkout")
    parser.add_argument("--only", nargs="*", default=None, help="rows 'group: form' or groups")
    parser.add_argument("--json", default=None, help="output (default runs/device-<time>.json)")
    args = parser.parse_args(argv)
    if args.small:
        args.repeats = min(args.repeats, 2)
    result = run(args)
    path = Path(args.json or f"runs/device-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_or_none(result), indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
