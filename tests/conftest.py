"""Shared meshes and helpers: 8 simulated CPU devices (set in the root conftest)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType


@pytest.fixture(scope="session")
def mesh1():
    return jax.make_mesh((2,), ("tp",))


@pytest.fixture(scope="session")
def mesh4():
    return jax.make_mesh((4,), ("tp",))


@pytest.fixture(scope="session")
def mesh2x2():
    return jax.make_mesh((2, 2), ("dp", "tp"))


@pytest.fixture(scope="session")
def mesh2x4():
    return jax.make_mesh((2, 4), ("dp", "tp"))


@pytest.fixture(scope="session")
def mesh3d():
    return jax.make_mesh((2, 2, 2), ("dp", "tp", "cp"))


@pytest.fixture(scope="session")
def auto_mesh():
    return jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
