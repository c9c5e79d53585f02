"""jlocalmap.testing: test your own sharded code, as PyTorch's ``DTensorTestBase``,
``with_comms`` and ``CommDebugMode`` do for DTensor (docs/testing.md).

- :func:`assert_matches_unsharded`: values and gradients against the unsharded
  reference, with a readable difference;
- :func:`expect_collectives`: the collectives of a compiled program, as a
  function or a ``with`` block;
- a pytest plugin (``pytest -p jlocalmap.testing``, or
  ``pytest_plugins = ["jlocalmap.testing"]`` in the root conftest.py): the option
  ``--jlm-devices N`` (N simulated CPU devices) and the fixtures ``mesh`` and
  ``make_mesh``.

Not imported by ``import jlocalmap``: it imports pytest.

Example:
    >>> from jlocalmap.testing import make_mesh, expect_collectives
    >>> make_mesh((2, 4), ("dp", "tp")).axis_names
    ('dp', 'tp')
"""

from jlocalmap.testing.compare import assert_matches_unsharded
from jlocalmap.testing.devices import simulate_cpu_devices
from jlocalmap.testing.diff import describe_mismatch
from jlocalmap.testing.expect import CollectiveRecorder, expect_collectives
from jlocalmap.testing.meshes import default_mesh, make_mesh

# The pytest hooks and fixtures (pytest loads the plugins a plugin names here).
pytest_plugins = ["jlocalmap.testing.plugin"]

__all__ = [
    "assert_matches_unsharded", "describe_mismatch",
    "expect_collectives", "CollectiveRecorder",
    "make_mesh", "default_mesh", "simulate_cpu_devices",
]
