"""Functional collectives for ``local_map`` bodies: the counterpart of torch's
``torch.distributed._functional_collectives``, on ``jax.lax``.

Each takes a local array and a ``group`` (see :mod:`jlocalmap.collectives.groups`) and must
run inside a ``local_map`` body (or ``jax.shard_map``). The values follow torch:
every device contributes its own local value, so a value that is invariant
(the same on every device of the group) counts once per device, e.g.
``all_reduce(x, "sum", group)`` of a replicated ``x`` is ``n * x``.

Gradients follow JAX's varying-axes typing, not torch's autograd formulas, and
equal the unsharded computation: the backward of ``all_reduce`` does not
all-reduce again (torch's does, giving 2x gradients in the Megatron MLP), and
``all_gather_tensor`` returns a replicated (invariant) value whose backward
takes each device's slice instead of torch's reduce-scatter.

``all_gather_matmul`` and ``matmul_reduce_scatter`` are the tensor-parallel
collective fused with its matmul, as a ring of ``ppermute`` steps that overlap
the transfers with the chunked matmul (docs/collectives.md compares them with
XLA's own windowed einsum).

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap import Replicate, Shard, collectives
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> f = jlm.local_map(lambda x: collectives.all_reduce(x, "sum", mesh),
    ...                   [Replicate()], ([Shard(0)],), device_mesh=mesh)
    >>> np.asarray(f(np.array([1.0, 2.0, 3.0, 4.0]))).tolist()
    [4.0, 6.0]
"""

from jlocalmap.collectives.functional import (
                                              REDUCE_OPS,
                                              all_gather_tensor,
                                              all_reduce,
                                              all_to_all_single,
                                              permute,
                                              reduce_scatter_tensor,
)
from jlocalmap.collectives.groups import GroupLike
from jlocalmap.collectives.matmul import all_gather_matmul, matmul_reduce_scatter

__all__ = ["REDUCE_OPS", "GroupLike", "all_reduce", "all_gather_tensor", "reduce_scatter_tensor",
           "all_to_all_single", "permute", "all_gather_matmul", "matmul_reduce_scatter"]
