"""Uneven inputs and outputs around the region: inputs are padded to their
even storage before the region (outputs along uneven dims become
:class:`~jlocalmap.layouts.uneven.UnevenArray`\\ s in ``region.outputs.assemble``), and once per call signature
with ``local_map(..., check_padding=True)`` the region runs on random data with
two different paddings: a body whose logical outputs change with the padding
mixes rows and is refused (``region.row_flow`` decides this from the body's
jaxpr for every uneven call, without running it).

Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jlocalmap as jlm
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> f = jlm.local_map(lambda x: x * 2, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
    >>> y = f(np.arange(5.0, dtype=np.float32))          # 3 + 2 rows
    >>> type(y).__name__, np.asarray(jlm.full_tensor(y)).tolist()
    ('UnevenArray', [0.0, 2.0, 4.0, 6.0, 8.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap.call.input_plan import InputPlan
from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.dtypes import as_numbers, random_like
from jlocalmap.layouts.meshes import mesh_context
from jlocalmap.layouts.uneven import pad, unpad
from jlocalmap.movement.distribute import distribute_tensor, full_tensor
from jlocalmap.movement.relayout import relayout, run_relayout


def pad_input(x: jax.Array, plan: InputPlan, fill: float = 0.0) -> jax.Array:
    """The padded storage of an uneven input given whole or evenly laid out
    (``fill`` other than 0 only in the padding check)."""
    if plan.src is not None:  # gather the whole value, then pad it
        x = relayout(x, plan.src, plan.src.replicated(), carry_devices=False)
    return pad(x, plan.dst, fill)


def check(run: Callable, plan, dyn: Sequence[Any], done: Any) -> None:
    """Refuse a body whose outputs change with the padding of its uneven
    inputs; ``run(plan, *values, pad_fill=...)`` is the region. Once per
    signature (``done`` holds the signatures checked)."""
    key = plan.key(dyn, shardings=True)
    if done.get(key):
        return
    # Random data of the signature, run now even inside a trace (jax.jit's).
    with jax.ensure_compile_time_eval(), mesh_context(plan.mesh):
        _compare_paddings(run, plan, dyn)
    done.put(key, True)


def _random_logical(plan: InputPlan, x: Any, rng: np.random.Generator) -> Any:
    return random_like(x, tuple(plan.dst.shape if plan.padded else np.shape(x)), rng)


def _sample(plan: InputPlan, data: np.ndarray, fill: float) -> Any:
    if plan.padded:
        return run_relayout(pad(jnp.asarray(data), plan.dst, fill), None, plan.dst.storage())
    source = plan.src if plan.src is not None else plan.dst.replicated()
    return distribute_tensor(data, source.mesh, source.placements)


def _compare_paddings(run: Callable, plan, dyn: Sequence[Any]) -> None:
    rng = np.random.default_rng(0)
    logical = [_random_logical(p, x, rng) for p, x in zip(plan.inputs, dyn, strict=True)]
    results = []
    for fill in (0.0, 1.0):
        samples = [_sample(p, data, fill) for p, data in zip(plan.inputs, logical, strict=True)]
        found: list = []   # the output facts of the trace
        fn = jax.jit(lambda *s, found=found, fill=fill: _keep(found, run(plan, *s, pad_fill=fill)))
        arrays = fn(*samples)
        results.append([np.asarray(unpad(np.asarray(as_numbers(full_tensor(a))), o.layout)) for a, o in
                        zip(arrays, found[-1].arrays, strict=True)])
    outputs = found[-1].arrays
    for o, a, b in zip(outputs, *results, strict=True):
        if not np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
            raise PlacementValueError(
                f"out_placements[{o.index}]: output {o.index} changes with the padding of "
                f"the uneven inputs {[p.index for p in plan.inputs if p.dst.is_uneven]}: "
                f"the body mixes rows along an uneven dim (a sum, mean or shift over it). "
                f"Mask the padding rows with jlocalmap.local_valid_size(size, axes), "
                f"or give that input Replicate() along the dim.")


def _keep(found: list, result: tuple) -> tuple:
    arrays, facts = result
    found.append(facts)
    return arrays
