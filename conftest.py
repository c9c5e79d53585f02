# Simulate 8 devices before anything imports jax (tests, doctests and docs alike).
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# docs/*.py are the site's build hooks (mkdocs, griffe): collected where the docs extra is.
import importlib.util  # noqa: E402

collect_ignore_glob = [] if importlib.util.find_spec("mkdocs") else ["docs/*.py"]

# jlocalmap's pytest plugin (--jlm-devices, the mesh and make_mesh fixtures), as users load it.
pytest_plugins = ["jlocalmap.testing"]

# docs pages whose examples need an optional package of the test extra: without it
# they skip, saying how to install it (as the test modules do, tests/helpers.need).
_PAGES_NEED = {"flax_nnx.md": ("flax", "optax")}


def pytest_runtest_setup(item):
    missing = [m for m in _PAGES_NEED.get(item.path.name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        import pytest
        pytest.skip(f"needs {', '.join(missing)}: pip install -e '.[test]'")
