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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it, stopped at the end.

    Sharing it across modules also checks that data conversions, which fork,
    leave the driver's Ray connection working after a Ray Train fit.
    """
    import ray

    from resmom.orchestrate import init_ray

    init_ray()
    yield
    ray.shutdown()
