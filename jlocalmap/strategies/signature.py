"""A region call's static signature: per positional argument its global shape,
dtype and current placements (or, for a non-array, its value). Under ``jax.jit``
all of it is known at trace time, so one choice holds per signature. The
signature also builds the call's abstract arguments (for lowering) and random
ones of the same layout (for verification and timing).

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap.strategies.signature import Signature
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> x = jlm.distribute_tensor(np.ones((4, 2), np.float32), mesh, [jlm.Shard(0)])
    >>> print(Signature.of((x, 3), mesh))
    f32[4,2]{S(0)}, 3
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jlocalmap.errors import LocalMapTypeError
from jlocalmap.layouts.placements import compact
from jlocalmap.layouts.specs import placements_to_spec
from jlocalmap.layouts.value_layout import mesh_of, placements_of
from jlocalmap.movement.distribute import distribute_tensor


def _placements(x: Any, mesh: jax.sharding.Mesh) -> Optional[tuple]:
    """The current placements of ``x`` on ``mesh``; None for a value on no mesh
    (host arrays, single-device arrays), which the region takes as global."""
    return None if mesh_of(x) is None else tuple(placements_of(x, mesh))


_DTYPES = {"float32": "f32", "float64": "f64", "bfloat16": "bf16", "float16": "f16",
           "int32": "s32", "int64": "s64", "bool": "pred"}


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """One positional argument: an array (shape, dtype, placements or None) or a
    static value."""
    shape: Optional[tuple] = None
    dtype: Optional[str] = None
    placements: Optional[tuple] = None
    static: Any = None

    @property
    def is_array(self) -> bool:
        return self.shape is not None

    @property
    def differentiable(self) -> bool:
        return self.dtype is not None and jnp.issubdtype(self.dtype, jnp.inexact)

    def __str__(self) -> str:
        if self.shape is None or self.dtype is None:
            return repr(self.static)
        text = f"{_DTYPES.get(self.dtype, self.dtype)}[{','.join(map(str, self.shape))}]"
        if self.placements is None:
            return text + "{global}"
        return text + "{" + compact(self.placements) + "}"


def _arg_spec(x: Any, mesh: jax.sharding.Mesh, index: int) -> ArgSpec:
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return ArgSpec(tuple(x.shape), str(jnp.dtype(x.dtype)), _placements(x, mesh))
    try:
        hash(x)
    except TypeError:
        raise LocalMapTypeError(
            f"args[{index}]: expected an array or a hashable static value (a number, "
            f"a string, None), found {type(x).__name__}; a strategy region takes its "
            f"arrays as separate positional arguments (no pytrees).") from None
    return ArgSpec(static=x)


@dataclasses.dataclass(frozen=True)
class Signature:
    """The static facts of one call (see the module docstring)."""
    args: tuple

    @classmethod
    def of(cls, args: Sequence[Any], mesh: jax.sharding.Mesh) -> "Signature":
        return cls(tuple(_arg_spec(x, mesh, i) for i, x in enumerate(args)))

    def __str__(self) -> str:
        return ", ".join(map(str, self.args))

    def key(self) -> str:
        """A stable text key (the measure cache's)."""
        return json.dumps([str(a) for a in self.args])

    def arrays(self, values: Sequence[Any]) -> list:
        """The array arguments among ``values`` (one per argument)."""
        return [x for x, a in zip(values, self.args, strict=True) if a.is_array]

    def over_arrays(self, fn: Callable) -> Callable:
        """``fn`` taking only the array arguments, its static ones bound (what
        ``jax.jit`` compiles: static values are no arrays)."""
        return lambda *arrays: fn(*with_statics(arrays, self))

    @property
    def differentiable(self) -> tuple[int, ...]:
        """Positions of the floating-point array arguments (the gradients taken)."""
        return tuple(i for i, a in enumerate(self.args) if a.differentiable)

    def abstract(self, mesh: jax.sharding.Mesh) -> list:
        """Arguments for ``jax.jit(...).lower``: ShapeDtypeStructs laid out on
        ``mesh`` as the call's arrays are; static values as they are."""
        def one(a: ArgSpec):
            if a.shape is None:
                return a.static
            if a.placements is None:
                return jax.ShapeDtypeStruct(a.shape, a.dtype)
            spec = placements_to_spec(a.placements, mesh, len(a.shape))
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))
        return [one(a) for a in self.args]

    def random(self, mesh: jax.sharding.Mesh, seed: int = 0) -> list:
        """Random arguments of this signature (normal floats, ints in 0..3),
        distributed as the call's are; concrete, also while a ``jax.jit`` traces."""
        rng = np.random.default_rng(seed)

        def one(a: ArgSpec):
            if a.shape is None:
                return a.static
            value = (rng.standard_normal(a.shape) if a.differentiable
                     else rng.integers(0, 4, a.shape)).astype(jnp.dtype(a.dtype))
            placements = a.placements
            if placements is None:
                return value
            place = jax.jit(lambda v: distribute_tensor(v, mesh, placements))
            return place.lower(jax.ShapeDtypeStruct(a.shape, a.dtype)).compile()(value)
        return [one(a) for a in self.args]


def with_statics(arrays: Sequence[Any], sig: Signature) -> list:
    """All arguments of ``sig``: ``arrays`` in the array positions, statics bound."""
    fed = iter(arrays)
    return [next(fed) if a.is_array else a.static for a in sig.args]
