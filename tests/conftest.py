"""Shared fixtures (helpers live in support.py: a module name of its own, since benchmarks/ has a conftest too)."""

from pathlib import Path

import pytest

from support import make_fake_cifar


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory) -> Path:
    return make_fake_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def cifar_copy(fake_cifar, tmp_path) -> Path:
    """A data dir whose files link to the session's fake set: a test may replace any one file."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (fake_cifar / "cifar-10-batches-py").iterdir():
        (folder / f.name).symlink_to(f)
    return tmp_path / "data"
