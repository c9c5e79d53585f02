"""A readable view of where a value lives: its mesh, placements, PartitionSpec,
and which index range of the global array each device holds.

Partial (unreduced) values are marked: each device holds a partial summand of
its index range, and the value is their sum. Plain text always; a ``rich``
table when the optional ``rich`` package is installed.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> mesh = jax.make_mesh((2, 4), ("dp", "tp"))
    >>> x = jlm.distribute_tensor(np.arange(64.0).reshape(8, 8), mesh, [jlm.Shard(0), jlm.Shard(1)])
    >>> print(jlm.inspect.describe(x))
    float32[8, 8]
    mesh: dp=2 (Explicit), tp=4 (Explicit)
    placements: [Shard(dim=0), Shard(dim=1)]
    PartitionSpec: P('dp', 'tp')
    device  mesh coords  holds
         0  dp=0 tp=0    [0:4, 0:2]
         1  dp=0 tp=1    [0:4, 2:4]
         2  dp=0 tp=2    [0:4, 4:6]
         3  dp=0 tp=3    [0:4, 6:8]
         4  dp=1 tp=0    [4:8, 0:2]
         5  dp=1 tp=1    [4:8, 2:4]
         6  dp=1 tp=2    [4:8, 4:6]
         7  dp=1 tp=3    [4:8, 6:8]
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from typing import Any, Optional, TextIO, cast

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlocalmap.errors import LocalMapTypeError, LocalMapValueError, PlacementValueError
from jlocalmap.inspect.inspection import Region
from jlocalmap.layouts.specs import format_spec, spec_entries
from jlocalmap.layouts.value_layout import placements_of

_COLUMNS = ("device", "mesh coords", "holds")


def _check(x: Any) -> jax.Array:
    if isinstance(x, jax.core.Tracer):
        raise LocalMapTypeError(
            "x: expected a concrete jax.Array, found a tracer (inside jax.jit, where "
            "devices hold nothing yet); describe the value outside jit, or print "
            "jax.typeof(x) inside.")
    if not isinstance(x, jax.Array):
        raise LocalMapTypeError(
            f"x: expected a jax.Array, found {type(x).__name__}; lay it out first with "
            f"jlocalmap.distribute_tensor(x, mesh, placements).")
    return x


def _slices(index: tuple, shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(f"{s.start or 0}:{shape[d] if s.stop is None else s.stop}"
                           for d, s in enumerate(index)) + "]"


def _header(x: jax.Array) -> list[str]:
    sharding = x.sharding
    lines = [f"{x.dtype.name}{list(x.shape)}"]
    if not isinstance(sharding, NamedSharding):
        return lines + [f"sharding: {sharding} (not on a mesh)"]
    mesh, spec = sharding.mesh, sharding.spec
    axes = ", ".join(f"{a}={n} ({t.name})" for a, n, t in
                     zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True))
    try:
        placements = str(list(placements_of(x)))
    except PlacementValueError:
        placements = "none (a dim is split over mesh axes out of mesh order)"
    lines += [f"mesh: {axes}", f"placements: {placements}",
              f"PartitionSpec: {format_spec(spec)}"]
    unreduced = sorted(spec.unreduced, key=mesh.axis_names.index)
    if unreduced:
        lines.append(f"Partial over {', '.join(unreduced)}: each device holds a partial "
                     f"summand of its index range;\nthe value is their sum")
    return lines


def _rows(x: jax.Array) -> list[tuple[str, str, str]]:
    """(device id, mesh coords, index range held) per device, in mesh order."""
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding):
        # device -> index held (jaxlib's Device has no type stub)
        held = cast("Mapping[Any, Any]", sharding.devices_indices_map(x.shape))
        return [(str(d.id), "-", _slices(held[d], x.shape))
                for d in sorted(held, key=lambda d: d.id)]
    mesh = sharding.mesh
    # JAX maps no indices for unreduced shardings; a summand spans what its shard does.
    shards = NamedSharding(mesh, PartitionSpec(*spec_entries(sharding.spec)))
    held = shards.devices_indices_map(x.shape)
    summand = " partial summand" if sharding.spec.unreduced else ""
    rows = []
    for coords in np.ndindex(*mesh.devices.shape):
        device: Any = mesh.devices[coords]   # a jaxlib Device
        where = " ".join(f"{a}={c}" for a, c in zip(mesh.axis_names, coords, strict=True))
        rows.append((str(device.id), where, _slices(held[device], x.shape) + summand))
    return rows


def describe(x: Any) -> str:
    """A plain-text description of the layout of ``x``: global dtype and shape,
    mesh, placements, PartitionSpec, and per device (in mesh order) its id, mesh
    coordinates and the slices of the global array it holds. For a
    :class:`~jlocalmap.inspect.Region` (from :func:`~jlocalmap.inspect.regions`): its name,
    mesh and operands, as ``region.pretty(jaxprs=False)`` prints them.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((2, 4), ("dp", "tp"))
        >>> x = jlm.distribute_tensor(np.ones((4, 8), np.float32), mesh,
        ...                           [jlm.Partial(), jlm.Shard(1)])
        >>> print(jlm.inspect.describe(x))
        float32[4, 8]
        mesh: dp=2 (Explicit), tp=4 (Explicit)
        placements: [Partial(sum), Shard(dim=1)]
        PartitionSpec: P(None, 'tp', unreduced={'dp'})
        Partial over dp: each device holds a partial summand of its index range;
        the value is their sum
        device  mesh coords  holds
             0  dp=0 tp=0    [0:4, 0:2] partial summand
             1  dp=0 tp=1    [0:4, 2:4] partial summand
             2  dp=0 tp=2    [0:4, 4:6] partial summand
             3  dp=0 tp=3    [0:4, 6:8] partial summand
             4  dp=1 tp=0    [0:4, 0:2] partial summand
             5  dp=1 tp=1    [0:4, 2:4] partial summand
             6  dp=1 tp=2    [0:4, 4:6] partial summand
             7  dp=1 tp=3    [0:4, 6:8] partial summand
    """
    if isinstance(x, Region):
        return x.pretty(jaxprs=False)
    x = _check(x)
    rows = _rows(x)
    width = max(len(_COLUMNS[1]), *(len(r[1]) for r in rows))
    table = [f"{_COLUMNS[0]}  {_COLUMNS[1]:<{width}}  {_COLUMNS[2]}"]
    table += [f"{d:>6}  {c:<{width}}  {h}" for d, c, h in rows]
    return "\n".join(_header(x) + table)


def print_layout(x: Any, *, use_rich: Optional[bool] = None,
                 file: Optional[TextIO] = None) -> None:
    """Print the layout of ``x`` (see :func:`describe`) to ``file`` (stdout by
    default): as a ``rich`` table when ``rich`` is installed and ``use_rich`` is
    not False, as plain text otherwise. ``use_rich=True`` requires ``rich``.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> x = jlm.distribute_tensor(np.ones((4, 2)), mesh, [jlm.Shard(0)])
        >>> jlm.inspect.print_layout(x, use_rich=False)
        float32[4, 2]
        mesh: tp=2 (Explicit)
        placements: [Shard(dim=0)]
        PartitionSpec: P('tp', None)
        device  mesh coords  holds
             0  tp=0         [0:2, 0:2]
             1  tp=1         [2:4, 0:2]
    """
    available = importlib.util.find_spec("rich") is not None
    if use_rich and not available:
        raise LocalMapValueError(
            "use_rich: expected the optional package rich to be installed for "
            "use_rich=True, found it missing; pip install rich, or pass "
            "use_rich=None to fall back to plain text.")
    file = sys.stdout if file is None else file
    if not (available and use_rich is not False):
        print(describe(x), file=file)
        return
    from rich.console import Console
    from rich.table import Table

    x = _check(x)
    table = Table(*_COLUMNS, title="\n".join(_header(x)), title_justify="left")
    for row in _rows(x):
        table.add_row(*row)
    Console(file=file).print(table)
