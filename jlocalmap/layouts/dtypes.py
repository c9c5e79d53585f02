"""The dtypes a distributed value may have, and which Partial reductions each has.

numpy's dtypes, ml_dtypes' (bfloat16, float8, int4 ...) and JAX's typed PRNG
keys (``jax.random.key``: an *extended* dtype that numpy cannot interpret) are
all laid out alike by Shard and Replicate. A Partial value is stored as JAX's
unreduced sum, so a dtype with no sum JAX can run is refused as Partial here,
before JAX's own error: bools (jax 0.12's reshard has no ``reduce_sum`` of bools,
0.10's gave their OR: refused on every version so that a program means the same on
both) and keys (random bits have no sum, max or min).

Example:
    >>> import jax, numpy as np
    >>> from jlocalmap.layouts.dtypes import as_dtype, dtype_of
    >>> as_dtype("float32"), dtype_of(jax.random.key(0))
    (dtype('float32'), key<fry>)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jlocalmap.errors import PlacementTypeError


def is_key(dtype: Any) -> bool:
    """Whether ``dtype`` is a typed PRNG key dtype (``jax.random.key``'s).

    Example:
        >>> import jax
        >>> is_key(jax.random.key(0).dtype), is_key("uint32")
        (True, False)
    """
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def as_dtype(dtype: Any) -> Any:
    """``dtype`` as a ``np.dtype``, or as itself where it is a JAX extended dtype
    (typed keys), which numpy cannot interpret. Both are hashable."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return dtype
    return np.dtype(dtype)


def dtype_of(x: Any) -> Any:
    """The dtype of an array, tracer or host number (see :func:`as_dtype`).

    Example:
        >>> import numpy as np
        >>> dtype_of(np.ones(2, np.int8)), dtype_of(2.5)
        (dtype('int8'), dtype('float64'))
    """
    return as_dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def random_like(x: Any, shape: tuple, rng: np.random.Generator) -> Any:
    """Random host data of ``shape`` and ``x``'s dtype: normal numbers for
    inexact dtypes, 0 and 1 for the others, random keys of ``x``'s
    implementation for PRNG keys.

    Example:
        >>> import jax, numpy as np
        >>> random_like(jax.random.key(0), (3,), np.random.default_rng(0)).shape
        (3,)
    """
    dtype = dtype_of(x)
    if is_key(dtype):
        impl = jax.random.key_impl(x)
        words = jax.random.key_data(jax.random.key(0, impl=impl))
        bits = rng.integers(0, 2 ** 32, tuple(shape) + words.shape, dtype=np.uint32)
        return jax.random.wrap_key_data(jax.numpy.asarray(bits), impl=impl)
    data = (rng.standard_normal(shape) if np.issubdtype(dtype, np.inexact)
            else rng.integers(0, 2, shape))
    return data.astype(dtype)


def as_numbers(x: Any) -> Any:
    """``x``, or for an array of PRNG keys its key data (unsigned words, one more
    dim): what numpy can hold and compare.

    Example:
        >>> import jax
        >>> as_numbers(jax.random.split(jax.random.key(0), 3)).shape
        (3, 2)
    """
    return jax.random.key_data(x) if is_key(dtype_of(x)) else x


def check_partial_dtype(dtype: Any, reduce_op: str, axis: str, what: str) -> None:
    """Refuse ``Partial(reduce_op)`` on mesh ``axis`` where ``dtype`` has no such
    reduction (``what`` names the argument in the error).

    Example:
        >>> import numpy as np, jlocalmap as jlm
        >>> check_partial_dtype(np.dtype(np.int8), "sum", "tp", "placements")  # fine
        >>> try:
        ...     check_partial_dtype(np.dtype(bool), "sum", "tp", "placements")
        ... except jlm.PlacementTypeError as e:
        ...     print(str(e)[:62])
        placements: Partial('sum') on mesh axis 'tp' for a bool value:
    """
    if dtype is None:
        return
    if is_key(dtype):
        raise PlacementTypeError(
            f"{what}: Partial({reduce_op!r}) on mesh axis {axis!r} for a value of PRNG keys "
            f"({dtype}): keys have no sum, max or min, so no device's key is a part of "
            f"another's. Give keys Replicate() (one key) or Shard() (a key per device or "
            f"row); to combine randomness, fold the keys with jax.random.fold_in.")
    if np.dtype(dtype) == np.bool_ and reduce_op in ("sum", "avg"):
        raise PlacementTypeError(
            f"{what}: Partial({reduce_op!r}) on mesh axis {axis!r} for a bool value: a "
            f"Partial value is stored as JAX's unreduced sum, and JAX cannot sum bools "
            f"(jax 0.12 refuses reduce_sum of bool; the sum of bools is no bool). Cast to "
            f"an integer dtype first (x.astype(jnp.int32)), or use Partial('max') for an "
            f"output (any device True) or Replicate().")
