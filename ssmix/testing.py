"""The kernel-equivalence harness: compare every fast form of a computation with its reference.

Two public functions:

- :func:`assert_close` compares two pytrees of arrays with a dtype-aware tolerance, slice by
  slice: every slice ``x[..., i, ...]`` of a leaf (each batch item, head, channel, ... along
  every axis) must satisfy ``RMS(got_s − ref_s) ≤ atol + ratio·RMS(ref_s)``, so a
  small-magnitude slice is held to the same relative accuracy as a large one.
  ``exact=True`` (or ``atol = ratio = 0``) means exact. NaN or inf in ``got`` where ``ref``
  is finite always fails. The failure message names the leaf, the worst slice, the worst
  index, both values and the error measures.
- :func:`check_equivalent` runs several implementations on the same arguments, compares every
  output leaf (outputs and final states alike) with the first implementation (the reference),
  and compares gradients with respect to every floating-point argument, obtained by
  back-propagating one shared random cotangent through each implementation.

Users can test their own kernels with it exactly as ssmix tests its own::

    from ssmix.testing import check_equivalent
    report = check_equivalent({"loop": reference_fn, "fast": fast_fn}, a, b)
    print(report)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "assert_close",
    "check_equivalent",
    "default_tolerance",
    "EquivalenceReport",
    "TraceStats",
    "trace_stats",
]

# (atol, ratio) per precision class. The ratio bounds the relative RMS error of every slice,
# which is the meaningful measure for long reductions (FFTs, scans) where single entries may
# be tiny; atol is the absolute floor for slices whose reference is ~0.
_TOLERANCES = {
    "float64": (1e-10, 1e-8),
    "float32": (1e-5, 2e-4),
    "float16": (1e-2, 2e-2),
    "bfloat16": (2e-2, 3e-2),
}


def _precision_class(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype == jnp.bfloat16:
        return "bfloat16"
    if dtype.kind in "biu":
        return "exact"
    if dtype.kind == "c":
        return "float64" if dtype.itemsize >= 16 else "float32"
    if dtype.itemsize >= 8:
        return "float64"
    if dtype.itemsize == 4:
        return "float32"
    return "float16"


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """Return the default ``(atol, ratio)`` for arrays of ``dtype``.

    float64 / complex128 are tight (1e-10, 1e-8); float32 / complex64 (1e-5, 2e-4);
    float16 and bfloat16 loose. Integer and boolean arrays must match exactly (0, 0).
    """
    cls = _precision_class(dtype)
    if cls == "exact":
        return 0.0, 0.0
    return _TOLERANCES[cls]


def _looser_dtype(a: np.ndarray, b: np.ndarray) -> Any:
    """The dtype of the two with the lower precision: it decides the tolerance."""
    order = ["exact", "float64", "float32", "float16", "bfloat16"]
    ca, cb = _precision_class(a.dtype), _precision_class(b.dtype)
    return a.dtype if order.index(ca) >= order.index(cb) else b.dtype


@dataclasses.dataclass(frozen=True)
class LeafError:
    """Errors of one compared leaf.

    Attributes:
      name: the leaf's name in the pytree.
      max_abs: the maximum absolute error ``max |ref − got|``.
      rel_rms: the relative RMS error of the whole leaf, ``‖ref − got‖₂ / ‖ref‖₂``.
      slice_rel: the worst relative RMS error of any slice ``x[..., i, ...]`` (every index
        ``i`` of every axis), ``‖ref_s − got_s‖₂ / ‖ref_s‖₂``; inf where a slice of zeros
        is matched by a non-zero one. The quantity the pass criterion bounds.
      passed: whether the leaf met the criterion (see :func:`assert_close`).
    """

    name: str
    max_abs: float
    rel_rms: float
    passed: bool
    slice_rel: float = 0.0


def _to_numpy(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16 or x.dtype == np.float16:
        return x.astype(np.float32)
    return x


def _failed(name: str, msg: str) -> tuple[LeafError, str]:
    return LeafError(name, np.inf, np.inf, False, np.inf), msg


def _slice_rms(sq: np.ndarray, axis: int) -> np.ndarray:
    """RMS of every slice ``x[..., i, ...]`` along ``axis``, from the squared magnitudes."""
    others = tuple(a for a in range(sq.ndim) if a != axis)
    count = sq.size // sq.shape[axis]
    return np.sqrt(np.sum(sq, axis=others) / count)


def _worst_slice(
    diff: np.ndarray, mag: np.ndarray, atol: float, ratio: float
) -> tuple[float, float, tuple[int, int] | None, float, float]:
    """Check ``rms(diff_s) <= atol + ratio·rms(ref_s)`` for every slice along every axis.

    Returns ``(score, slice_rel, where, err, bound)``: the worst ``rms(diff_s) / bound_s``
    (``<= 1`` passes; inf where the bound is 0 and the error is not), the worst relative error
    ``rms(diff_s) / rms(ref_s)``, and the ``(axis, index)``, error and bound of the slice that
    scored worst (None for a 0-d leaf).
    """
    d2, r2 = diff**2, mag**2
    if diff.ndim == 0:
        err, ref = float(diff), float(mag)
        bound = atol + ratio * ref
        score = err / bound if bound > 0 else (0.0 if err == 0 else np.inf)
        rel = err / ref if ref > 0 else (0.0 if err == 0 else np.inf)
        return score, rel, None, err, bound
    best = (-1.0, 0.0, None, 0.0, 0.0)
    worst_rel = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(diff.ndim):
            err = _slice_rms(d2, axis)
            ref = _slice_rms(r2, axis)
            bound = atol + ratio * ref
            score = np.where(bound > 0, err / bound, np.where(err == 0, 0.0, np.inf))
            rel = np.where(ref > 0, err / ref, np.where(err == 0, 0.0, np.inf))
            worst_rel = max(worst_rel, float(rel.max()))
            i = int(np.argmax(score))
            if score[i] > best[0]:
                best = (float(score[i]), 0.0, (axis, i), float(err[i]), float(bound[i]))
    return best[0], worst_rel, best[2], best[3], best[4]


def _compare_leaf(
    ref: Any,
    got: Any,
    *,
    ratio: float | None,
    atol: float | None,
    name: str,
    check_dtype: bool,
    exact: bool = False,
) -> tuple[LeafError, str | None]:
    """Compare one leaf; return its errors and a failure message (None when it passes)."""
    ref_raw, got_raw = np.asarray(ref), np.asarray(got)
    if ref_raw.shape != got_raw.shape:
        return _failed(
            name, f"{name}: shape mismatch, expected {ref_raw.shape}, got {got_raw.shape}"
        )
    if check_dtype and ref_raw.dtype != got_raw.dtype:
        return _failed(
            name, f"{name}: dtype mismatch, expected {ref_raw.dtype}, got {got_raw.dtype}"
        )
    if np.iscomplexobj(got_raw) and not np.iscomplexobj(ref_raw):
        return _failed(
            name, f"{name}: got a complex array where the reference is real ({ref_raw.dtype})"
        )
    d_atol, d_ratio = default_tolerance(_looser_dtype(ref_raw, got_raw))
    if exact:
        atol, ratio = 0.0, 0.0
    atol = d_atol if atol is None else float(atol)
    ratio = d_ratio if ratio is None else float(ratio)
    if not (atol >= 0 and ratio >= 0):
        raise ValueError(f"atol and ratio must be non-negative numbers; got {atol!r}, {ratio!r}")
    r, g = _to_numpy(ref_raw), _to_numpy(got_raw)
    if r.size == 0:
        return LeafError(name, 0.0, 0.0, True), None

    ref_finite, got_finite = np.isfinite(r), np.isfinite(g)
    # Non-finite entries must coincide exactly (same NaN positions, same signed infinities).
    same_nonfinite = (~ref_finite) & (~got_finite) & ((r == g) | (np.isnan(r) & np.isnan(g)))
    bad = ~got_finite & ~same_nonfinite
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return _failed(
            name,
            f"{name}: {int(bad.sum())} non-finite value(s) in the result that the reference "
            f"does not have; first at index {idx}: expected {r[idx]!r}, got {g[idx]!r}",
        )
    lost = ~ref_finite & got_finite
    if lost.any():
        idx = tuple(int(i) for i in np.argwhere(lost)[0])
        return _failed(
            name,
            f"{name}: the reference is non-finite at {idx} ({r[idx]!r}) but the result is "
            f"{g[idx]!r}",
        )

    mask = ref_finite
    if r.dtype.kind in "biu" and g.dtype.kind in "biu":
        diff = np.abs(r.astype(np.int64) - g.astype(np.int64)).astype(np.float64)
        mag = np.abs(r.astype(np.float64))
    else:
        rr = r.astype(np.complex128 if np.iscomplexobj(r) else np.float64)
        gg = g.astype(np.complex128 if np.iscomplexobj(g) else np.float64)
        rr, gg = np.where(mask, rr, 0), np.where(mask, gg, 0)
        diff, mag = np.abs(rr - gg), np.abs(rr)
    max_abs = float(diff.max())
    ref_norm = float(np.sqrt(np.sum(mag**2)))
    err_norm = float(np.sqrt(np.sum(diff**2)))
    rel_rms = err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else np.inf)
    score, slice_rel, where, s_err, s_bound = _worst_slice(diff, mag, atol, ratio)
    if score <= 1.0:
        return LeafError(name, max_abs, rel_rms, True, slice_rel), None
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    if where is None:
        place = "the value"
    else:
        lead = ", ".join(":" if a != where[0] else str(where[1]) for a in range(diff.ndim))
        place = f"slice [{lead}]"
    if atol == 0 and ratio == 0:
        rule = "exact equality was required"
    else:
        rule = f"bound atol + ratio·RMS(ref) = {atol:.1e} + {ratio:.1e}·RMS(ref)"
    msg = (
        f"{name}: RMS error {s_err:.3e} of {place} exceeds {s_bound:.3e} ({rule}); "
        f"max abs error {max_abs:.3e}, worst index {idx}: expected {r[idx]!r}, got {g[idx]!r}; "
        f"relative RMS error {rel_rms:.3e} over the leaf, {slice_rel:.3e} in the worst slice "
        f"(shape {r.shape}, dtype {got_raw.dtype})"
    )
    return LeafError(name, max_abs, rel_rms, False, slice_rel), msg


def _named_leaves(tree: Any, prefix: str) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(prefix + jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def _compare_trees(
    ref: Any,
    got: Any,
    *,
    ratio: float | None,
    atol: float | None,
    name: str,
    check_dtype: bool,
    exact: bool = False,
) -> tuple[list[LeafError], list[str]]:
    ref_struct = jax.tree_util.tree_structure(ref)
    got_struct = jax.tree_util.tree_structure(got)
    if ref_struct != got_struct:
        msg = f"{name}: pytree structure mismatch, expected {ref_struct}, got {got_struct}"
        return [LeafError(name, np.inf, np.inf, False)], [msg]
    errors, failures = [], []
    for (leaf_name, r), (_, g) in zip(
        _named_leaves(ref, name), _named_leaves(got, name), strict=True
    ):
        err, msg = _compare_leaf(
            r,
            g,
            ratio=ratio,
            atol=atol,
            name=leaf_name or "value",
            check_dtype=check_dtype,
            exact=exact,
        )
        errors.append(err)
        if msg is not None:
            failures.append(msg)
    return errors, failures


def assert_close(
    ref: Any,
    got: Any,
    *,
    ratio: float | None = None,
    atol: float | None = None,
    name: str = "",
    check_dtype: bool = False,
    exact: bool = False,
) -> list[LeafError]:
    """Assert that two pytrees of arrays agree, leaf by leaf and slice by slice.

    A leaf passes when every slice ``x[..., i, ...]`` (every index ``i`` along every axis:
    each batch item, head, channel, time step, ...) satisfies

        ``RMS(got_s − ref_s) ≤ atol + ratio · RMS(ref_s)``,

    the RMS form of numpy's ``|got − ref| ≤ atol + rtol·|ref|``. A 0-d leaf is its own slice,
    so a 1-d leaf is compared element by element. Measured per slice, a small-magnitude batch
    item or channel is held to the same relative accuracy as a large one (a whole-leaf
    relative norm would let it be wrong, even sign-flipped). ``atol = ratio = 0`` (or
    ``exact=True``) means exact equality; ``atol = 0`` alone means purely relative.

    Args:
      ref: the reference value (array or pytree of arrays).
      got: the value under test, with the same pytree structure and leaf shapes.
      ratio: relative bound (per slice, against the RMS of the reference slice); default by
        dtype (see :func:`default_tolerance`; the less precise dtype of the pair decides).
      atol: absolute floor of the bound, in the units of the values: what a slice whose
        reference is ~0 (or cancels) may be off by; default by dtype.
      name: prefix for the leaf names in the failure message.
      check_dtype: also require identical dtypes.
      exact: require exact equality (same values, same NaN positions), whatever the dtype;
        overrides ``atol`` and ``ratio``.

    Returns:
      The per-leaf errors (useful for reports).

    Raises:
      AssertionError: naming every failing leaf, its worst slice with its error and bound,
        the worst index with both values, and the leaf's error measures. NaN or inf in ``got``
        that are not in ``ref`` always fail; non-finite entries of ``ref`` must be matched
        exactly (same NaN positions, same signed infinities).
      ValueError: negative ``atol`` or ``ratio``.
    """
    errors, failures = _compare_trees(
        ref, got, ratio=ratio, atol=atol, name=name, check_dtype=check_dtype, exact=exact
    )
    if failures:
        raise AssertionError("\n".join(failures))
    return errors


@dataclasses.dataclass
class EquivalenceReport:
    """Worst errors per implementation, for outputs and gradients, against the reference.

    ``rows[impl][part]`` (``part`` ``"output"`` or ``"grad"``) is ``(max abs error, relative
    RMS error of a whole leaf, relative RMS error of the worst slice)``, each the worst over
    the leaves (see :class:`LeafError`).
    """

    reference: str
    rows: dict[str, dict[str, tuple[float, float, float]]]

    def __str__(self) -> str:
        lines = [
            f"reference: {self.reference}",
            f"{'impl':<24}{'part':<10}{'max abs':>12}{'rel rms':>12}{'slice rel':>12}",
        ]
        for impl, parts in self.rows.items():
            for part, (max_abs, rel_rms, slice_rel) in parts.items():
                lines.append(
                    f"{impl:<24}{part:<10}{max_abs:>12.3e}{rel_rms:>12.3e}{slice_rel:>12.3e}"
                )
        return "\n".join(lines)


def _is_differentiable(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(
        jnp.asarray(x).dtype, jnp.inexact
    )


def _random_like(key: jax.Array, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        kr, ki = jax.random.split(key)
        real_dtype = jnp.finfo(x.dtype).dtype
        re = jax.random.normal(kr, x.shape, real_dtype)
        im = jax.random.normal(ki, x.shape, real_dtype)
        return (re + 1j * im).astype(x.dtype)
    return jax.random.normal(key, x.shape, x.dtype)


def _worst(errors: list[LeafError]) -> tuple[float, float, float]:
    if not errors:
        return 0.0, 0.0, 0.0
    return (
        max(e.max_abs for e in errors),
        max(e.rel_rms for e in errors),
        max(e.slice_rel for e in errors),
    )


def check_equivalent(
    impls: Mapping[str, Callable[..., Any]],
    *args: Any,
    grads: bool = True,
    seed: int = 0,
    ratio: float | None = None,
    atol: float | None = None,
    grad_ratio: float | None = None,
    grad_atol: float | None = None,
    check_dtype: bool = True,
    exact: bool = False,
) -> EquivalenceReport:
    """Check that several implementations of one computation agree, values and gradients.

    The first entry of ``impls`` is the reference. Each implementation is called as
    ``fn(*args)``; its output may be any pytree (for example ``(y, final_state)``). Every
    output leaf is compared with the reference's by :func:`assert_close`, and the reference
    itself must be finite.

    With ``grads=True`` one random cotangent per inexact output leaf (drawn from ``seed``) is
    back-propagated through every implementation, i.e. the gradient of
    ``Σ Re⟨cotangent, output⟩`` is taken with respect to every floating-point or complex
    array among the (possibly nested) ``args``; those gradients are compared with the
    reference's as well. Non-array and integer arguments are held fixed.

    Args:
      impls: name -> callable, reference first (at least two entries).
      *args: the shared arguments.
      grads: also compare gradients.
      seed: seed of the shared cotangent.
      ratio, atol: tolerances for outputs (defaults by dtype, see :func:`default_tolerance`).
      grad_ratio, grad_atol: tolerances for gradients (default: ``ratio`` and ``atol``).
      check_dtype: require every implementation to return the reference's dtypes.
      exact: require exact equality of outputs and gradients (overrides the tolerances).

    Returns:
      An :class:`EquivalenceReport` with the worst errors per implementation.

    Raises:
      ValueError: fewer than two implementations.
      AssertionError: any disagreement, naming the implementation and the leaf.
    """
    if len(impls) < 2:
        raise ValueError(f"check_equivalent needs at least two implementations, got {len(impls)}")
    names = list(impls)
    ref_name = names[0]
    outputs = {name: impls[name](*args) for name in names}
    ref_out = outputs[ref_name]
    for leaf_name, leaf in _named_leaves(ref_out, f"{ref_name}"):
        arr = np.asarray(leaf)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise AssertionError(f"reference output {leaf_name} contains NaN or inf")

    rows: dict[str, dict[str, tuple[float, float, float]]] = {}
    failures: list[str] = []
    for name in names[1:]:
        errs, fails = _compare_trees(
            ref_out,
            outputs[name],
            ratio=ratio,
            atol=atol,
            name=f"[{name}] output",
            check_dtype=check_dtype,
            exact=exact,
        )
        rows[name] = {"output": _worst(errs)}
        failures += fails

    if grads:
        flat_args, treedef = jax.tree_util.tree_flatten(args)
        diff_idx = [i for i, x in enumerate(flat_args) if _is_differentiable(x)]
        if not diff_idx:
            raise ValueError("grads=True but no floating-point array among the arguments")
        out_leaves = [
            leaf
            for leaf in jax.tree_util.tree_leaves(ref_out)
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
        ]
        keys = jax.random.split(jax.random.PRNGKey(seed), max(len(out_leaves), 1))
        cotangents = [_random_like(k, leaf) for k, leaf in zip(keys, out_leaves, strict=False)]

        def make_loss(fn: Callable[..., Any]) -> Callable[..., jax.Array]:
            def loss(*diff_vals: jax.Array) -> jax.Array:
                flat = list(flat_args)
                for i, v in zip(diff_idx, diff_vals, strict=True):
                    flat[i] = v
                out = fn(*jax.tree_util.tree_unflatten(treedef, flat))
                leaves = [
                    leaf
                    for leaf in jax.tree_util.tree_leaves(out)
                    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
                ]
                if len(leaves) != len(cotangents):
                    raise AssertionError(
                        f"implementation returned {len(leaves)} inexact leaves, the reference "
                        f"{len(cotangents)}"
                    )
                total = jnp.zeros((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
                for leaf, cot in zip(leaves, cotangents, strict=True):
                    total = total + jnp.sum(jnp.real(jnp.conj(cot) * leaf)).astype(total.dtype)
                return total

            return loss

        diff_vals = [flat_args[i] for i in diff_idx]
        argnums = tuple(range(len(diff_idx)))
        # Gradients are keyed by the position of the argument leaf in the flattened args.
        grads_by_impl = {
            name: dict(
                zip(
                    (f"arg{i}" for i in diff_idx),
                    jax.grad(make_loss(impls[name]), argnums=argnums)(*diff_vals),
                    strict=True,
                )
            )
            for name in names
        }
        for leaf_name, leaf in _named_leaves(grads_by_impl[ref_name], f"{ref_name} grad"):
            arr = np.asarray(leaf)
            if not np.all(np.isfinite(arr)):
                raise AssertionError(f"reference gradient {leaf_name} contains NaN or inf")
        g_ratio = ratio if grad_ratio is None else grad_ratio
        g_atol = atol if grad_atol is None else grad_atol
        for name in names[1:]:
            errs, fails = _compare_trees(
                grads_by_impl[ref_name],
                grads_by_impl[name],
                ratio=g_ratio,
                atol=g_atol,
                name=f"[{name}] grad",
                check_dtype=check_dtype,
                exact=exact,
            )
            rows[name]["grad"] = _worst(errs)
            failures += fails

    if failures:
        raise AssertionError(
            f"implementations disagree with the reference '{ref_name}':\n" + "\n".join(failures)
        )
    return EquivalenceReport(reference=ref_name, rows=rows)


# --------------------------------------------------------------------------------------
# Trace statistics: how an accelerator would see a computation, read off its jaxpr.


@dataclasses.dataclass(frozen=True)
class TraceStats:
    """What :func:`trace_stats` found in a jaxpr.

    Attributes:
      loop_iterations: sequential loop iterations in total: the trip count of every
        ``scan`` / ``while`` summed, a nested loop counted once per iteration of its parent
        (an outer loop of ``n`` steps around an inner one of ``m`` counts ``n·(1 + m)``).
        Loops inside a ``pallas_call`` are the kernel's own business and do not count.
      largest_bytes: size of the largest array any equation produces (loop bodies count
        their per-iteration arrays; a scan's stacked outputs count at full size).
      largest: ``"dtype[shape] from primitive"`` of that array.
      loops: ``(primitive, trip count)`` of every outermost loop (one not inside another
        loop body; calls such as ``pjit`` or ``custom_vjp`` are looked into), in trace order.
      unknown_loops: ``while`` loops whose trip count is not known at trace time (counted
        as one iteration each in ``loop_iterations``).
    """

    loop_iterations: int
    largest_bytes: int
    largest: str
    loops: tuple[tuple[str, int | None], ...]
    unknown_loops: int

    def __str__(self) -> str:
        mib = self.largest_bytes / 2**20
        return (
            f"{self.loop_iterations} loop iterations ({len(self.loops)} loops, "
            f"{self.unknown_loops} of unknown length); largest array {mib:.1f} MiB "
            f"({self.largest})"
        )


def _fori_trip_count(eqn) -> int | None:
    """Trip count of a ``while`` that ``lax.fori_loop`` emitted with literal bounds."""
    from jax.extend.core import Literal

    cond = eqn.params["cond_jaxpr"].jaxpr
    n_consts = eqn.params["cond_nconsts"]
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
        return None
    lhs, rhs = cond.eqns[0].invars
    carry = cond.invars[n_consts:]
    if lhs not in carry or rhs not in carry:
        return None
    init = eqn.invars[eqn.params["body_nconsts"] + n_consts :]
    lo, hi = init[carry.index(lhs)], init[carry.index(rhs)]
    if isinstance(lo, Literal) and isinstance(hi, Literal):
        return max(int(hi.val) - int(lo.val), 0)
    return None


def _walk(jaxpr, stats: dict, top: bool) -> int:
    """Accumulate the largest output into ``stats``; return the loop iterations of ``jaxpr``."""
    from jax.extend.core import jaxprs_in_params

    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                size = int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
                if size > stats["bytes"]:
                    stats["bytes"] = size
                    stats["what"] = f"{aval.str_short()} from {eqn.primitive.name}"
        name = eqn.primitive.name
        if name == "pallas_call":
            continue
        subs = list(jaxprs_in_params(eqn.params))
        if name == "scan":
            trip = int(eqn.params["length"])
        elif name == "while":
            trip = _fori_trip_count(eqn)
            if trip is None:
                stats["unknown"] += 1
        else:
            trip = None
        # Loops inside a loop body are counted through their parent, not listed.
        in_loop = name in ("scan", "while")
        inner = [_walk(sub, stats, top=top and not in_loop) for sub in subs]
        if name in ("scan", "while"):
            n = 1 if trip is None else trip
            total += n * (1 + sum(inner))
            if top:
                stats["loops"].append((name, trip))
        elif name == "cond":
            total += max(inner, default=0)
        else:
            total += sum(inner)
    return total


def trace_stats(fn: Callable, *args: Any, **kwargs: Any) -> TraceStats:
    """Trace ``fn(*args, **kwargs)`` with ``jax.make_jaxpr`` and count its loops and memory.

    Nothing is executed or compiled, so the shapes can be those of a long run (pass
    ``jax.ShapeDtypeStruct`` arguments) and the forms can be those of another backend
    (trace inside ``ssmix.auto_backend("gpu")``). To see a training step, pass a function
    that computes the forward pass and its gradient, e.g. ``jax.grad(loss)``.
    """
    closed = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
    stats = {"bytes": 0, "what": "nothing", "loops": [], "unknown": 0}
    iterations = _walk(closed.jaxpr, stats, top=True)
    return TraceStats(
        loop_iterations=iterations,
        largest_bytes=stats["bytes"],
        largest=stats["what"],
        loops=tuple(stats["loops"]),
        unknown_loops=stats["unknown"],
    )
