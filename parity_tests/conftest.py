"""Shared test setup: float64 everywhere, hypothesis profiles, the --slow flag, the ``bk`` fixture."""

from __future__ import annotations

import importlib.util
import os

import pytest

# The fused kernels' tests run Triton's CPU interpreter, whose switch must be set before triton is
# first imported by any test in a worker (the compile checks run in subprocesses that set it to 0).
os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # float64 must be switched on before any JAX array exists
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
except ImportError:  # the torch-only environment
    pass

try:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:
    pass

try:
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=12, derandomize=True, **common)
    settings.register_profile("dev", max_examples=25, **common)
    settings.register_profile("slow", max_examples=300, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
except ImportError:
    pass


@pytest.fixture(params=["torch", "jax"])
def bk(request):
    """Each backend in turn (``parity_tests/backends.py``); skipped where its framework is missing."""
    from .backends import backend

    return backend(request.param)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="run slow sweeps and long checks")
    parser.addoption("--cases-per-test", type=int, default=0, metavar="N",
                     help="keep the first N cases of each test function that the installed frameworks run "
                          "(cases of a missing framework are kept: they skip); .ci/run's extra environments")


def pytest_configure(config):
    if config.getoption("--slow"):
        try:
            from hypothesis import settings

            settings.load_profile("slow")
        except ImportError:
            pass


def pytest_collection_modifyitems(config, items):
    _keep_cases_per_test(config, items)
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _keep_cases_per_test(config, items):
    """With --cases-per-test N, deselect all but the first N runnable cases of each test function.

    A case parametrized by a framework that is not installed ("torch" / "jax" as a parameter value)
    is kept and not counted: it skips, which is what the one-framework environments check."""
    limit = config.getoption("--cases-per-test")
    if limit <= 0:
        return
    missing = {name for name in ("torch", "jax") if importlib.util.find_spec(name) is None}
    kept, dropped, seen = [], [], {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if missing & {v for v in params.values() if isinstance(v, str)} or "slow" in item.keywords:
            kept.append(item)
            continue
        key = (item.path, item.originalname)
        seen[key] = seen.get(key, 0) + 1
        (kept if seen[key] <= limit else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
