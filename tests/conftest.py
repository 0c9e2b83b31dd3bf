"""Shared test fixtures. Exactness tests run under float64 through the `x64` fixture."""

import jax
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
