"""jlocalmap: PyTorch DTensor's ``local_map`` for JAX, on ``jax.shard_map``."""

from jlocalmap import collectives
from jlocalmap._caches import clear_caches
from jlocalmap._renamed import deprecated_aliases as _deprecated_aliases
from jlocalmap.errors import (LocalMapError, PlacementTypeError, PlacementValueError,
                              UnevenArrayError)
from jlocalmap.estimate import Estimate, Hardware, estimate
from jlocalmap.inspect.comm import CommCounts, collectives_in_hlo, count_collectives
from jlocalmap.inspect.inspection import Region, regions
from jlocalmap.inspect.layout_view import describe, print_layout
from jlocalmap.inspect.residuals import Residual
from jlocalmap.layouts.placements import Partial, Placement, Replicate, Shard
from jlocalmap.layouts.specs import placements_to_spec, spec_to_placements
from jlocalmap.layouts.uneven import UnevenArray, local_valid_size
from jlocalmap.layouts.value_layout import placements_of
from jlocalmap.local_map import LocalMapped, local_map
from jlocalmap.movement.distribute import distribute_tensor, full_tensor, redistribute
from jlocalmap.region.record import RegionArray, RegionSettings, region_settings
from jlocalmap.strategies import CostModel, Link, StrategyRegion, strategy_region

__all__ = [
    "LocalMapError", "PlacementTypeError", "PlacementValueError", "UnevenArrayError",
    "Placement", "Shard", "Replicate", "Partial",
    "placements_to_spec", "spec_to_placements",
    "local_map", "LocalMapped", "clear_caches",
    "distribute_tensor", "redistribute", "placements_of", "full_tensor",
    "collectives", "CommCounts", "count_collectives", "collectives_in_hlo",
    "describe", "print_layout",
    "regions", "region_settings", "Region", "RegionSettings", "RegionArray", "Residual",
    "UnevenArray", "local_valid_size",
    "strategy_region", "StrategyRegion", "CostModel", "Link",
    "estimate", "Estimate", "Hardware",
]

# Renamed public names: the old spelling works, with a DeprecationWarning naming the new.
__getattr__ = _deprecated_aliases("jlocalmap", globals(),
                                  {"RegionCall": "RegionSettings", "Operand": "RegionArray"})
