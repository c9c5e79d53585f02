"""jlocalmap's error classes: every error the library raises on bad input is one
of these, so callers can catch them and tests can tell them from JAX's own.

Example:
    >>> import jlocalmap as jlm
    >>> issubclass(jlm.PlacementValueError, ValueError)
    True
"""


class LocalMapError(Exception):
    """Base class of every jlocalmap error.

    Example:
        >>> import jlocalmap as jlm
        >>> issubclass(jlm.PlacementTypeError, jlm.LocalMapError)
        True
    """


class PlacementValueError(LocalMapError, ValueError):
    """A value is of the right kind but wrong: a count, a dim, a mesh, a layout.

    Example:
        >>> import jlocalmap as jlm
        >>> try:
        ...     jlm.Partial("mean")
        ... except jlm.PlacementValueError as e:
        ...     print("Partial(reduce_op)" in str(e))
        True
    """


class PlacementTypeError(LocalMapError, TypeError):
    """An argument is of the wrong kind (a string where a placement belongs...).

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
