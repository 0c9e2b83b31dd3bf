"""Which backend the ``"auto"`` rules resolve for, and a way to pretend to be another one.

Every ``mode="auto"`` / ``method="auto"`` / default chunk size in ssmix is decided in Python
at trace time from :func:`auto_backend`, which is ``jax.default_backend()`` folded to one of
``"cpu"``, ``"gpu"``, ``"tpu"`` unless a ``with auto_backend(name):`` block overrides it. The
rules are plain Python branches (not ``lax.platform_dependent``, which lowers every branch),
so a function traced under ``auto_backend("gpu")`` on a CPU host contains exactly what a GPU
would run: that is how the tests count the loops of the accelerator forms without a device.

The override acts when a function is traced. A function that is already compiled (a
``jax.jit`` cache hit) keeps the forms it was traced with; jit a fresh function, or call
``jax.clear_caches()``, after changing the backend.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

__all__ = ["BACKENDS", "auto_backend", "pallas_interpret", "pallas_variant", "resolve_backend"]

#: The backends the ``"auto"`` rules know.
BACKENDS = ("cpu", "gpu", "tpu")

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ssmix_auto_backend", default=None
)

# jax.default_backend() names per platform; ROCm and CUDA GPUs follow the same rules.
_PLATFORM = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def _check(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return name


def _device_backend() -> str:
    # Unknown plugins (METAL, ...) get the accelerator rules: they are never the tuned CPU.
    return _PLATFORM.get(jax.default_backend().lower(), "gpu")


@contextlib.contextmanager
def _override(name: str) -> Iterator[str]:
    token = _OVERRIDE.set(name)
    try:
        yield name
    finally:
        _OVERRIDE.reset(token)


def auto_backend(name: str | None = None):
    """The backend the ``"auto"`` rules resolve for, or a context manager that sets it.

    ``auto_backend()`` returns ``"cpu"``, ``"gpu"`` or ``"tpu"``: the innermost active
    override, else ``jax.default_backend()``. ``with auto_backend("gpu"):`` makes every rule
    traced inside the block resolve as on a GPU (on any host), e.g.::

        with ssmix.auto_backend("tpu"):
            jaxpr = jax.make_jaxpr(jax.grad(loss))(params)   # the TPU forms, traced on a CPU
    """
    if name is None:
        current = _OVERRIDE.get()
        return current if current is not None else _device_backend()
    return _override(_check(name))


def resolve_backend(backend: str | None) -> str:
    """``backend`` checked against :data:`BACKENDS`, or :func:`auto_backend` when ``None``."""
    return auto_backend() if backend is None else _check(backend)


def pallas_interpret(interpret: bool | None) -> bool:
    """A Pallas kernel's ``interpret`` option: None means Pallas's interpreter exactly when
    ``jax.default_backend()`` is the CPU (where there is no compiled Pallas), compiled
    elsewhere."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def pallas_variant(backend: str | None = None) -> str:
    """Which variant of ssmix's Pallas kernels to trace for ``backend`` (None:
    :func:`auto_backend`): ``"gpu"`` (Triton: programs run concurrently, so a sequence is
    walked by a loop inside one program) under the GPU rules, ``"tpu"`` (Mosaic: the
    sequence on a sequential grid axis; also what the CPU interpreter runs) otherwise."""
    return "gpu" if resolve_backend(backend) == "gpu" else "tpu"
