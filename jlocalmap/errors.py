"""jlocalmap's error classes: every error the library raises on bad input is one
of these, so callers can catch them and tests can tell them from JAX's own.

``LocalMapValueError`` and ``LocalMapTypeError`` are the two kinds (an argument of
the right kind with a wrong value, an argument of the wrong kind), subclasses of
``ValueError`` and ``TypeError``. ``PlacementValueError`` and ``PlacementTypeError``
are their placement cases: a placement, placement list, ``PartitionSpec`` or mesh
that cannot lay out the value (a Shard dim out of range, a Partial kind JAX cannot
hold, inputs placed otherwise than ``in_placements`` says). Errors about anything
else (a function that is not callable, a ``Link``'s bandwidth, a collective's
shapes, strategy alternatives that disagree) are the plain kinds.

Example:
    >>> import jlocalmap as jlm
    >>> issubclass(jlm.PlacementValueError, jlm.LocalMapValueError), \\
    ...     issubclass(jlm.LocalMapValueError, ValueError)
    (True, True)
"""


class LocalMapError(Exception):
    """Base class of every jlocalmap error.

    Example:
        >>> import jlocalmap as jlm
        >>> issubclass(jlm.PlacementTypeError, jlm.LocalMapError)
        True
    """


class LocalMapValueError(LocalMapError, ValueError):
    """An argument is of the right kind but its value is wrong (a count, a size,
    a shape, a bandwidth...).

    Example:
        >>> import jlocalmap as jlm
        >>> try:
        ...     jlm.strategies.Link(bandwidth=0.0, latency=0.0)
        ... except jlm.LocalMapValueError as e:
        ...     print("bandwidth > 0" in str(e))
        True
    """


class LocalMapTypeError(LocalMapError, TypeError):
    """An argument is of the wrong kind (a string where a function belongs...).

    Example:
        >>> import jlocalmap as jlm
        >>> try:
        ...     jlm.local_map("not a function", [jlm.Replicate()])
        ... except jlm.LocalMapTypeError as e:
        ...     print(str(e).split(";")[0])
        func: expected a callable to run on local shards, found str
    """


class PlacementValueError(LocalMapValueError):
    """A placement, placement list, spec or mesh that cannot lay out the value:
    a count, a dim, a reduce op, a layout that differs from the one required.

    Example:
        >>> import jlocalmap as jlm
        >>> try:
        ...     jlm.Partial("mean")
        ... except jlm.PlacementValueError as e:
        ...     print("Partial(reduce_op)" in str(e))
        True
    """


class PlacementTypeError(LocalMapTypeError):
    """A placement argument of the wrong kind (a string where a placement belongs...).

    Example:
        >>> import jlocalmap as jlm
        >>> try:
        ...     jlm.Shard("0")
        ... except jlm.PlacementTypeError as e:
        ...     print("Shard(dim)" in str(e))
        True
    """


class UnevenArrayError(LocalMapError):
    """A :class:`~jlocalmap.UnevenArray` was used as an array (arithmetic, a
    ``jax.numpy`` function). It is deliberately not a ``TypeError``: ``jax.jit``
    replaces a ``TypeError`` raised for an argument by its own message, and this
    one says what to do.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> x = jlm.distribute_tensor(np.arange(5.0), jax.make_mesh((2,), ("tp",)), [jlm.Shard(0)])
        >>> try:
        ...     x + 1
        ... except jlm.UnevenArrayError as e:
        ...     print("full_tensor" in str(e))
        True
    """
