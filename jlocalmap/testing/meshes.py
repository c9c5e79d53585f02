"""Meshes for tests: a checked ``jax.make_mesh`` over the first devices, and the
default mesh of the ``mesh`` fixture.

Example:
    >>> from jlocalmap.testing import make_mesh
    >>> dict(make_mesh((2, 2), ("dp", "tp")).shape)
    {'dp': 2, 'tp': 2}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import jax
from jax.sharding import AxisType, Mesh

from jlocalmap import LocalMapTypeError, LocalMapValueError

DEFAULT_AXIS = "x"  # JAX's own examples name a 1-D mesh's axis "x"


def make_mesh(shape: Sequence[int], names: Sequence[str],
              axis_types: Optional[Sequence[AxisType]] = None) -> Mesh:
    """``jax.make_mesh(shape, names)`` over the first ``prod(shape)`` devices
    (Explicit axes unless ``axis_types`` says otherwise), with errors that name the
    argument: a shape that needs more devices than JAX has says how to get them.

    Example:
        >>> from jlocalmap.testing import make_mesh
        >>> try:
        ...     make_mesh((4, 4), ("dp", "tp"))
        ... except ValueError as e:
        ...     print(str(e).split(";")[0])
        shape: (4, 4) needs 16 devices, but JAX has 8
    """
    shape, names = _checked_shape(shape), _checked_names(names)
    if len(shape) != len(names):
        raise LocalMapValueError(
            f"names: expected one axis name per dim of shape {shape} ({len(shape)}), "
            f"found {len(names)}: {names}.")
    needed, available = math.prod(shape), jax.device_count()
    if needed > available:
        raise LocalMapValueError(
            f"shape: {shape} needs {needed} devices, but JAX has {available}; use a "
            f"shape of at most {available} devices, or simulate more CPU devices "
            f"(pytest --jlm-devices {needed}).")
    types = None if axis_types is None else tuple(axis_types)
    return jax.make_mesh(shape, names, axis_types=types, devices=jax.devices()[:needed])


def default_mesh() -> Mesh:
    """The ``mesh`` fixture's mesh: one axis, ``"x"``, over every device, as
    PyTorch's ``DTensorTestBase.build_device_mesh`` spans the whole world.

    Example:
        >>> from jlocalmap.testing import default_mesh
        >>> dict(default_mesh().shape)
        {'x': 8}
    """
    return make_mesh((jax.device_count(),), (DEFAULT_AXIS,))


def _checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if (not isinstance(shape, Sequence) or isinstance(shape, str)
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise LocalMapTypeError(
            f"shape: expected a tuple of axis sizes, found {shape!r}; pass e.g. (2, 4).")
    if not shape or min(shape) < 1:
        raise LocalMapValueError(
            f"shape: expected at least one axis, each of size >= 1, found {tuple(shape)}.")
    return tuple(shape)


def _checked_names(names: Sequence[str]) -> tuple[str, ...]:
    if (isinstance(names, str) or not isinstance(names, Sequence)
            or not all(isinstance(n, str) for n in names)):
        raise LocalMapTypeError(
            f"names: expected a tuple of axis names, found {names!r}; pass e.g. "
            f"('dp', 'tp') (a single axis: ('tp',)).")
    if len(set(names)) != len(names):
        raise LocalMapValueError(f"names: expected distinct axis names, found {tuple(names)}.")
    return tuple(names)
