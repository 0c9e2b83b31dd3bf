"""Shared test fixtures. Exactness tests run under float64 through the `x64` fixture."""

import contextlib
import os

# XLA:CPU's multi-threaded Eigen pool can deadlock when a batched LAPACK call (or a threaded
# FFT) inside a jitted computation schedules work onto the pool it runs on (jaxlib 0.10; see
# README, Known issues). The suite runs one process per core anyway, so it runs every
# computation single-threaded. Set before jax creates its CPU backend.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()
# The suite's shapes are tiny, so compilation dominates its time: LLVM's optimisation level 0
# compiles about 35 % faster (measured on the heaviest tests) and the tests compare forms
# within one configuration, so nothing depends on it. Notebooks and subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest
from hypothesis import HealthCheck, settings

# JIT compilation makes the first example of a property test slow; no deadline per example.
settings.register_profile(
    "ssmix", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=15
)
settings.load_profile("ssmix")


@pytest.fixture
def x64():
    """Enable 64-bit types for the duration of one test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=["float32", "float64"])
def float_dtype(request):
    """Run a test under float32 and under float64 (x64 enabled for the latter)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jax.numpy.float64
    else:
        yield jax.numpy.float32


@pytest.fixture(autouse=True)
def _restore_package_logging():
    """Undo ``experiments.logs.setup_logging`` after each test (the CLI mains call it): its
    handler and ``propagate=False`` on the package loggers would hide their records from
    ``caplog`` in later tests of the same worker."""
    yield
    import logging

    for name in ("experiments", "ssmix"):
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if h.get_name() == "ssmix-cli"]:
            log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)


@contextlib.contextmanager
def persistent_compilation_cache(path):
    """Cache every compiled executable under ``path`` while the block runs (then restore the
    settings): tests that build the same jitted steps several times (a run, its resume, its
    evaluation) load them instead of compiling again."""
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
