"""DTensor-style placement types: ``Shard(dim)``, ``Replicate()``, ``Partial(op)``.

A placement describes how one mesh axis lays out a global value, exactly as in
``torch.distributed.tensor``. A *placement list* has one entry per mesh axis, in
``mesh.axis_names`` order.

Example:
    >>> import jlocalmap as jlm
    >>> jlm.Shard(0) == jlm.Shard(0), jlm.Partial(), jlm.Replicate().is_replicate()
    (True, Partial(sum), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

from jlocalmap.errors import PlacementTypeError, PlacementValueError

ReduceOp = Literal["sum", "avg", "max", "min"]
REDUCE_OPS: tuple[str, ...] = ("sum", "avg", "max", "min")


class Placement:
    """Base class of the three placements; use :class:`Shard`, :class:`Replicate`
    or :class:`Partial`.

    Example:
        >>> import jlocalmap as jlm
        >>> isinstance(jlm.Shard(1), jlm.Placement)
        True
    """

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        if cls is Placement:
            raise PlacementTypeError(
                "Placement(): the base class has no meaning of its own; use "
                "Shard(dim), Replicate() or Partial(reduce_op).")
        return super().__new__(cls)

    def is_shard(self, dim: Optional[int] = None) -> bool:
        """True for ``Shard`` (of ``dim``, when given).

        Example:
            >>> import jlocalmap as jlm
            >>> jlm.Shard(1).is_shard(), jlm.Shard(1).is_shard(0)
            (True, False)
        """
        return False

    def is_replicate(self) -> bool:
        """True for ``Replicate()``.

        Example:
            >>> import jlocalmap as jlm
            >>> jlm.Replicate().is_replicate()
            True
        """
        return False

    def is_partial(self) -> bool:
        """True for ``Partial(op)``.

        Example:
            >>> import jlocalmap as jlm
            >>> jlm.Partial("avg").is_partial()
            True
        """
        return False


@dataclasses.dataclass(frozen=True)
class Shard(Placement):
    """Tensor dim ``dim`` is split across the mesh axis (``torch.chunk`` order).

    Example:
        >>> import jlocalmap as jlm
        >>> jlm.Shard(0)
        Shard(dim=0)
    """

    dim: int

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise PlacementTypeError(
                f"Shard(dim): expected an int tensor dimension, found {self.dim!r} "
                f"of type {type(self.dim).__name__}; write e.g. Shard(0).")

    def is_shard(self, dim: Optional[int] = None) -> bool:
        return dim is None or dim == self.dim

    def __repr__(self) -> str:
        return f"Shard(dim={self.dim})"


@dataclasses.dataclass(frozen=True)
class Replicate(Placement):
    """Every device on the mesh axis holds the whole value.

    Example:
        >>> import jlocalmap as jlm
        >>> jlm.Replicate()
        Replicate()
    """

    def is_replicate(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "Replicate()"


@dataclasses.dataclass(frozen=True)
class Partial(Placement):
    """Every device holds a same-shaped partial value; the true value is their
    reduction with ``reduce_op`` (``"sum"``, ``"avg"``, ``"max"`` or ``"min"``).

    Example:
        >>> import jlocalmap as jlm
        >>> jlm.Partial(), jlm.Partial("avg")
        (Partial(sum), Partial(avg))
    """

    reduce_op: ReduceOp = "sum"

    def __post_init__(self) -> None:
        if self.reduce_op not in REDUCE_OPS:
            raise PlacementValueError(
                f"Partial(reduce_op): expected one of {REDUCE_OPS}, found "
                f"{self.reduce_op!r}; write e.g. Partial('sum').")

    def is_partial(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Partial({self.reduce_op})"


# The type names of placement arguments and results, exported for annotations:
Placements = Sequence[Placement]
"""A placement list as an argument: one placement per mesh axis, in
``mesh.axis_names`` order (a list or a tuple), as ``distribute_tensor`` takes.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> def shard_rows(x, mesh: jax.sharding.Mesh, placements: jlm.Placements):
    ...     return jlm.distribute_tensor(x, mesh, placements)
    >>> shard_rows(np.ones(4), jax.make_mesh((2,), ("dp",)), [jlm.Shard(0)]).shape
    (4,)
"""
PlacementList = tuple[Placement, ...]
"""A placement list as jlocalmap returns it (``placements_of``): a tuple.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> x = jlm.distribute_tensor(np.ones(4), jax.make_mesh((2,), ("dp",)), [jlm.Shard(0)])
    >>> placements: jlm.PlacementList = jlm.placements_of(x)
    >>> placements
    (Shard(dim=0),)
"""
PlacementTree = Any
"""``local_map``'s ``out_placements`` / ``in_placements`` / ``in_grad_placements``:
one entry per flattened leaf (a :data:`Placements`, or None for a non-array leaf),
a single :data:`Placements` for a single value, or a pytree prefix of the values
whose entries are these. Its nodes may be any registered pytree type, which a type
checker cannot spell; ``local_map`` checks it when called.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> inputs: jlm.PlacementTree = ({"w": [jlm.Shard(0)], "step": None},)  # a prefix
    >>> f = jlm.local_map(lambda p: p["w"] * p["step"], [jlm.Shard(0)], inputs,
    ...                   device_mesh=jax.make_mesh((2,), ("dp",)))
    >>> np.asarray(f({"w": np.arange(4.0), "step": 2.0})).tolist()
    [0.0, 2.0, 4.0, 6.0]
"""
PlacementsLike = Union[Placement, Placements]


def compact(placements: Optional[PlacementsLike]) -> str:
    """A placement list in DTensor's short notation (``S(0)``, ``R``, ``P(sum)``),
    as in region names; ``-`` for None (a leaf without placements).

    Example:
        >>> import jlocalmap as jlm
        >>> from jlocalmap.layouts.placements import compact
        >>> compact([jlm.Shard(0), jlm.Replicate(), jlm.Partial("avg")])
        'S(0)RP(avg)'
    """
    if placements is None:
        return "-"
    if isinstance(placements, Placement):
        placements = (placements,)
    return "".join(f"S({p.dim})" if isinstance(p, Shard) else
                   f"P({p.reduce_op})" if isinstance(p, Partial) else "R"
                   for p in placements)
