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
