"""jlocalmap: PyTorch DTensor's ``local_map`` for JAX, on ``jax.shard_map``.

The top level is what a sharded program is written with: the placements and their
type names, ``local_map``, the layout calls, ``UnevenArray`` and ``Layout``, and the
errors. Tools live in namespaces (docs/architecture.md, "Where names live"):
``jlocalmap.inspect`` (regions, collective counts, layout views),
``jlocalmap.strategies`` (strategy regions and their cost model),
``jlocalmap.collectives`` (collectives for bodies) and ``jlocalmap.testing``.
"""

from jlocalmap import collectives, inspect, strategies
from jlocalmap._caches import clear_caches
from jlocalmap._deprecation import deprecated_names as _deprecated_names
from jlocalmap.errors import (
    LocalMapError,
    LocalMapTypeError,
    LocalMapValueError,
    PlacementTypeError,
    PlacementValueError,
    UnevenArrayError,
)
from jlocalmap.estimate import Estimate, Hardware, estimate
from jlocalmap.layouts.layout import Layout
from jlocalmap.layouts.placements import (
    Partial,
    Placement,
    PlacementList,
    Placements,
    PlacementTree,
    Replicate,
    Shard,
)
from jlocalmap.layouts.specs import placements_to_spec, spec_to_placements
from jlocalmap.layouts.uneven import UnevenArray, local_valid_size
from jlocalmap.layouts.value_layout import placements_of
from jlocalmap.local_map import LocalMapped, local_map
from jlocalmap.movement.distribute import distribute_tensor, full_tensor, redistribute

__all__ = [
    "LocalMapError", "LocalMapValueError", "LocalMapTypeError",
    "PlacementValueError", "PlacementTypeError", "UnevenArrayError",
    "Placement", "Shard", "Replicate", "Partial", "Placements", "PlacementList", "PlacementTree",
    "placements_to_spec", "spec_to_placements",
    "local_map", "LocalMapped", "clear_caches",
    "distribute_tensor", "redistribute", "placements_of", "full_tensor",
    "UnevenArray", "Layout", "local_valid_size",
    "collectives", "inspect", "strategies",
    "estimate", "Estimate", "Hardware",
]

# Names that moved into the namespaces or were renamed (issue 30): served for one
# more release, with a DeprecationWarning naming the new spelling.
_MOVED = {
    **{name: f"jlocalmap.inspect.{name}" for name in (
        "regions", "Region", "region_settings", "RegionSettings", "RegionArray", "Residual",
        "count_collectives", "collectives_in_hlo", "CommCounts", "describe", "print_layout")},
    "RegionCall": "jlocalmap.inspect.RegionSettings",
    "Operand": "jlocalmap.inspect.RegionArray",
    **{name: f"jlocalmap.strategies.{name}" for name in (
        "strategy_region", "StrategyRegion", "CostModel", "Link")},
}
__getattr__ = _deprecated_names(__name__, _MOVED)
