"""Shared fixtures: the digits `.beton` files are written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from resmom.data.beton import prepare


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def digits_paths(data_dir: Path) -> dict[str, Path]:
    return prepare("digits", data_dir)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for the tests of one module, stopped after them.

    NOTE: one instance for the whole session hung in `ray.cluster_resources()`
    in tests/test_sweep_e2e.py after tests/test_sources.py had converted and
    interrupted datasets in forked FFCV writer processes of this process
    (Ray 2.60). The cause was not found; a fresh instance per module avoids it.
    """
    import ray

    from resmom.orchestrate import init_ray

    init_ray()
    yield
    ray.shutdown()
