"""The pytest plugin of jlocalmap.testing: ``--jlm-devices N`` and the fixtures
``mesh`` and ``make_mesh`` (loaded by ``pytest -p jlocalmap.testing`` or
``pytest_plugins = ["jlocalmap.testing"]`` in the root conftest.py).

Without its option the plugin changes nothing: it adds the two fixtures and
the ``jlm_mesh`` marker. There is no ``pytest11`` entry point, so installing
jlocalmap does not load it into every pytest run of the environment (it imports
jax, and its ``mesh`` fixture would be offered to every project).

Example:
    >>> from jlocalmap.testing import plugin
    >>> callable(plugin.pytest_addoption) and callable(plugin.pytest_configure)
    True
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from jax.sharding import Mesh

from jlocalmap.testing.devices import simulate_cpu_devices
from jlocalmap.testing.meshes import default_mesh, make_mesh

_MARKER = ("jlm_mesh(shape, names): the mesh that the `mesh` fixture gives this test, "
           "as make_mesh(shape, names) builds it")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--jlm-devices N``."""
    parser.getgroup("jlocalmap").addoption(
        "--jlm-devices", type=int, default=None, metavar="N", dest="jlm_devices",
        help="run JAX on N simulated CPU devices (jax_num_cpu_devices, set before "
             "JAX's backend starts; overrides XLA_FLAGS' device count)")


def pytest_configure(config: pytest.Config) -> None:
    """Set the device count (before collection runs any JAX operation)."""
    config.addinivalue_line("markers", _MARKER)
    devices = config.getoption("jlm_devices", default=None)
    if devices is None:
        return
    try:
        simulate_cpu_devices(devices)
    except (RuntimeError, ValueError, TypeError) as e:
        raise pytest.UsageError(f"--jlm-devices {devices}: {e}") from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Where the option is given: the devices the tests run on."""
    if config.getoption("jlm_devices", default=None) is None:
        return []  # reading the devices now would start JAX before the conftests load
    import jax
    return [f"jlocalmap.testing: {jax.device_count()} {jax.devices()[0].platform} devices"]


@pytest.fixture(name="make_mesh", scope="session")
def make_mesh_fixture() -> Callable[..., Mesh]:
    """A factory, :func:`jlocalmap.testing.make_mesh`:
    ``make_mesh((2, 4), ("dp", "tp"))`` in a test; a shape needing more devices
    than JAX has is a ``ValueError`` naming ``shape``."""
    return make_mesh


@pytest.fixture(name="mesh")
def mesh_fixture(request: pytest.FixtureRequest) -> Mesh:
    """One axis ``"x"`` over every device (:func:`jlocalmap.testing.default_mesh`),
    or the mesh of the closest ``@pytest.mark.jlm_mesh(shape, names)`` marker
    (on the test, its class or module)."""
    marker = request.node.get_closest_marker("jlm_mesh")
    if marker is None:
        return default_mesh()
    return make_mesh(*marker.args, **marker.kwargs)
