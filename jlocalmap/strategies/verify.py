"""Verification: every alternative gives the first one's values and gradients
on one random input of the call's signature (global values compared, so the
alternatives' layouts may differ). The gradients are of ``sum(outputs * c)``
with a random ``c`` per output, so a gradient scaled, reduced twice or not at
all shows. An alternative that differs is refused, by name.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap import Shard
    >>> from jlocalmap.strategies.verify import Alternative, Signature, verify  # the stage's records
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> alts = [Alternative.of(n, jlm.local_map(f, [Shard(0)], ([Shard(0)],), device_mesh=mesh), i)
    ...         for i, (n, f) in enumerate([("double", lambda x: 2 * x), ("add", lambda x: x + x),
    ...                                     ("triple", lambda x: 3 * x)])]
    >>> x = jlm.distribute_tensor(np.ones(4, np.float32), mesh, [Shard(0)])
    >>> try:
    ...     verify(alts, None, Signature.of((x,), mesh), mesh)
    ... except jlm.LocalMapValueError as e:
    ...     print(str(e).split(" differs")[0])
    alternative 'triple' does not compute what 'double' computes: value of output 0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap.errors import LocalMapValueError
from jlocalmap.movement.distribute import full_tensor
from jlocalmap.strategies.alternatives import Alternative, compiled, float_outputs
from jlocalmap.strategies.signature import Signature, with_statics

_RTOL = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 1e-4, "float64": 1e-10}


def _values_and_gradients(alt: Alternative, out_placements: Any, sig: Signature,
                          mesh, arrays: Sequence[Any]) -> list[tuple[str, np.ndarray]]:
    """(label, global value) of every output and of every input's gradient, on
    the array arguments ``arrays``."""
    call = alt.placed(out_placements)
    wrt = sig.differentiable

    def loss(*args):
        outs = float_outputs(call(*args))
        rng = np.random.default_rng(1)  # the same weights for every alternative
        weights = [rng.standard_normal(o.shape).astype(np.float32) for o in outs]
        return sum(jnp.sum(full_tensor(o).astype(jnp.float32) * w)
                   for o, w in zip(outs, weights, strict=True))

    def values_and_gradients(*arrays):
        args = with_statics(arrays, sig)
        outs = [full_tensor(o) for o in jax.tree_util.tree_leaves(call(*args))]
        grads = jax.grad(loss, argnums=wrt)(*args) if wrt else ()
        return outs, [full_tensor(g) for g in grads]

    _, program = compiled(values_and_gradients, sig.arrays(sig.abstract(mesh)), mesh)
    outs, grads = program(*arrays)
    return ([(f"value of output {i}", np.asarray(o, np.float64)) for i, o in enumerate(outs)]
            + [(f"gradient of argument {i}", np.asarray(g, np.float64))
               for i, g in zip(wrt, grads, strict=True)])


def _tolerance(sig: Signature) -> float:
    dtypes = [a.dtype for a in sig.args if a.differentiable]
    return max((_RTOL.get(d, 1e-4) for d in dtypes), default=1e-4)


def _differs(got: np.ndarray, want: np.ndarray, rtol: float) -> Optional[str]:
    if got.shape != want.shape:
        return f"has shape {got.shape}, expected {want.shape}"
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1.0)
    worst = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not worst <= rtol * scale:
        return f"differs by {worst:.3g} (max |difference|; tolerance {rtol * scale:.2g})"
    return None


def verify(alternatives: Sequence[Alternative], out_placements: Any, sig: Signature,
           mesh: jax.sharding.Mesh) -> None:
    """Raise ``LocalMapValueError`` naming the first alternative whose values or
    gradients differ from the first alternative's on one random input."""
    rtol = _tolerance(sig)
    arrays = sig.arrays(sig.random(mesh))
    first = _values_and_gradients(alternatives[0], out_placements, sig, mesh, arrays)
    for alt in alternatives[1:]:
        found = _values_and_gradients(alt, out_placements, sig, mesh, arrays)
        if len(found) != len(first):
            raise LocalMapValueError(
                f"alternative {alt.name!r} returns {len(found) - len(sig.differentiable)} "
                f"outputs, {alternatives[0].name!r} returns "
                f"{len(first) - len(sig.differentiable)}; all alternatives of a region "
                f"have the same global signature.")
        for (label, got), (_, want) in zip(found, first, strict=True):
            problem = _differs(got, want, rtol)
            if problem:
                raise LocalMapValueError(
                    f"alternative {alt.name!r} does not compute what "
                    f"{alternatives[0].name!r} computes: {label} {problem}\n"
                    f"(checked on a random input of signature {sig}); fix its body or "
                    f"its placements (in_grad_placements for a gradient), or drop it.")
