"""Plain `pytest` runs each benchmark once, untimed (a smoke test); `pytest --benchmark-only` times them."""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not config.getoption("benchmark_only", False) and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True
