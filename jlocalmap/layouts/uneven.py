"""Uneven shards: DTensor's ``torch.chunk`` layouts, which JAX cannot hold.

JAX refuses a sharding whose mesh axes do not divide the dim. jlocalmap holds an
uneven value as an :class:`UnevenArray`: its logical shape and placements, and a
*padded* ``jax.Array`` laid out evenly, in which every device's chunk along an
uneven dim is padded at its end to the largest chunk's length. The chunk sizes
are DTensor's: ``torch.chunk`` order, ceil-sized chunks, the last ones smaller or
empty, nested in mesh order when several axes split the dim.

What a body sees for an uneven input: the padded local chunk, valid rows first,
padding rows after them (zeros). Its outputs are mapped back by dropping the
padding rows, so a body may compute row by row along an uneven dim; a body that
mixes rows (a sum over that dim, say) must mask with :func:`local_valid_size`.
jlocalmap checks this when it compiles: it runs the region on random data with
two different paddings and refuses a body whose outputs change.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> x = jlm.distribute_tensor(np.arange(5.0), mesh, [jlm.Shard(0)])   # 3 + 2 rows
    >>> np.asarray(x.padded).tolist()                                       # padded 3 + 3
    [0.0, 1.0, 2.0, 3.0, 4.0, 0.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlocalmap._jax_compat import refuse_as_array
from jlocalmap.errors import UnevenArrayError
from jlocalmap.layouts.chunks import chunk_bounds, padding_index
from jlocalmap.layouts.layout import Layout


def pad(x: jax.Array, layout: Layout, fill: float = 0.0) -> jax.Array:
    """The padded storage of logical ``x`` laid out by ``layout``."""
    for d, size, _, splits in layout.uneven:
        gather, _ = padding_index(size, splits)
        filler = jnp.full(x.shape[:d] + (1,) + x.shape[d + 1:], fill, x.dtype)
        x = jnp.take(jnp.concatenate([x, filler], axis=d), jnp.asarray(gather), axis=d)
    return x


def unpad(x: Any, layout: Layout) -> jax.Array:
    """The logical value of padded ``x`` (the inverse of :func:`pad`)."""
    for d, size, _, splits in layout.uneven:
        _, valid = padding_index(size, splits)
        x = jnp.take(x, jnp.asarray(valid), axis=d)
    return x


def local_valid_size(global_size: int, axes: str | Sequence[str]) -> jax.Array:
    """Inside a local_map body: how many leading rows of this device's chunk of
    a dim of ``global_size``, split over ``axes`` (in mesh order), are real rows;
    the rest is padding. Use it to mask reductions over an uneven dim.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.layouts.uneven import local_valid_size
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> def total(x):
        ...     rows = jnp.arange(x.shape[0]) < local_valid_size(5, "tp")
        ...     return jax.lax.psum(jnp.where(rows, x, 0).sum(), "tp")
        >>> f = jlm.local_map(total, [jlm.Replicate()], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> float(f(np.arange(5.0, dtype=np.float32)))
        10.0
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    sizes = tuple(jax.lax.axis_size(a) for a in axes)
    lengths = jnp.asarray([length for _, length in chunk_bounds(global_size, sizes)])
    index: Any = 0   # a traced int once the first axis index is added
    for a, n in zip(axes, sizes, strict=True):
        index = index * n + jax.lax.axis_index(a)
    return lengths[index]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)   # == is arithmetic too: refused
class UnevenArray:
    """A value laid out with uneven shards: ``padded`` (an evenly sharded
    ``jax.Array``) and its :class:`~jlocalmap.layouts.layout.Layout` (logical ``shape``,
    ``placements``, ``mesh``). ``jlocalmap.full_tensor`` gives the logical
    array; ``local_map`` takes and returns it. It is a pytree, so it passes
    through ``jax.jit`` and ``jax.grad``.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> x = jlm.distribute_tensor(np.arange(5.0), mesh, [jlm.Shard(0)])
        >>> x.shape, x.padded.shape
        ((5,), (6,))
    """

    padded: Any
    layout: Layout

    shape = property(lambda self: self.layout.shape, doc="The logical shape.")
    placements = property(lambda self: self.layout.placements, doc="The placements.")
    mesh = property(lambda self: self.layout.mesh, doc="The mesh it lives on.")
    dtype = property(lambda self: self.padded.dtype, doc="The dtype.")
    ndim = property(lambda self: self.layout.ndim, doc="The logical rank.")

    def tree_flatten(self):
        return (self.padded,), (self.layout,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        return (f"UnevenArray(shape={self.shape}, dtype={self.dtype}, "
                f"placements={list(self.placements)}, padded shape={self.padded.shape})")


def not_an_array(x: UnevenArray, use: str = "a jax.numpy function") -> UnevenArrayError:
    """The error for ``x`` used as an array in ``use``: what an UnevenArray is,
    and the ways out."""
    return UnevenArrayError(
        f"{use}: expected an array, found {x!r}. An UnevenArray is jlocalmap's value "
        "for a layout whose mesh axes do not divide a dim (DTensor's torch.chunk shards, "
        "which a jax.Array cannot hold): an evenly sharded array with padding rows plus "
        "the logical shape, not an array itself. Ways out: jlm.full_tensor(x) for the "
        "logical jax.Array; sizes divisible by the mesh axes, so that values are plain "
        "jax.Arrays; or the computation inside a local_map region, which takes and "
        "returns UnevenArrays (docs/uneven.md).")


def _refusal(use: str) -> Callable[..., Any]:
    def method(self: UnevenArray, *args: Any, **kwargs: Any) -> Any:
        raise not_an_array(self, use)
    return method


_OPERATORS = {**{f"{r}{name}": f"the operator {symbol}" for name, symbol in (
    ("add", "+"), ("sub", "-"), ("mul", "*"), ("truediv", "/"), ("floordiv", "//"),
    ("mod", "%"), ("pow", "**"), ("matmul", "@"), ("and", "&"), ("or", "|"), ("xor", "^"),
    ("lshift", "<<"), ("rshift", ">>")) for r in ("", "r")},
    **{name: f"the operator {symbol}" for name, symbol in (
        ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!="),
        ("neg", "unary -"), ("pos", "unary +"), ("abs", "abs()"), ("invert", "~"))},
    "getitem": "indexing", "array": "numpy", "jax_array": "a jax.numpy function"}
for _name, _use in _OPERATORS.items():
    setattr(UnevenArray, f"__{_name}__", _refusal(_use))
UnevenArray.__hash__ = None  # type: ignore[assignment]  # unhashable, as a jax.Array
refuse_as_array(UnevenArray, not_an_array)
