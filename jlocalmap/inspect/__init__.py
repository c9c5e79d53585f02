"""jlocalmap.inspect: reading programs and values, the counterpart of PyTorch's
``torch.distributed.tensor.debug``: the ``local_map`` regions of a traced program
(:func:`regions`), their settings and residuals, the collectives a compiled
program runs (:func:`count_collectives`) and where a value's pieces live
(:func:`describe`, :func:`print_layout`).

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> f = jlm.local_map(lambda x: jax.lax.psum(x, "tp"), [jlm.Replicate()],
    ...                   ([jlm.Shard(0)],), device_mesh=mesh)
    >>> jlm.inspect.count_collectives(f, np.ones(4, np.float32)).counts["all-reduce"]
    1
"""

from jlocalmap.inspect.comm import Collective, CommCounts, collectives_in_hlo, count_collectives
from jlocalmap.inspect.inspection import Region, regions
from jlocalmap.inspect.layout_view import describe, print_layout
from jlocalmap.inspect.residuals import Residual
from jlocalmap.layouts.specs import format_spec
from jlocalmap.region.record import RegionArray, RegionSettings, region_settings

__all__ = [
    "regions", "Region", "region_settings", "RegionSettings", "RegionArray", "Residual",
    "count_collectives", "collectives_in_hlo", "CommCounts", "Collective",
    "describe", "print_layout", "format_spec",
]
