"""describe / print_layout: the index ranges listed are the ones the devices hold
(checked against each device's shard of random data), in mesh order."""

import io
import re
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from helpers import randn
from jlocalmap import Partial, Replicate, Shard

ROW = re.compile(r"^\s*(\d+)  (.+?)\s+\[([^\]]*)\]( partial summand)?$")


def rows(text):
    """(device id, coords, slices, partial) of each table row of ``describe``."""
    out = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            slices = tuple(slice(*map(int, s.split(":"))) for s in m.group(3).split(", ") if s)
            out.append((int(m.group(1)), m.group(2), slices, bool(m.group(4))))
    return out


@pytest.mark.parametrize("fixture, placements", [
    ("mesh1", [Shard(1)]),
    ("mesh2x4", [Shard(0), Shard(1)]),
    ("mesh2x4", [Shard(1), Shard(1)]),
    ("mesh2x4", [Replicate(), Shard(0)]),
    ("mesh3d", [Shard(0), Replicate(), Shard(1)]),
])
def test_rows_match_the_shards_devices_hold(request, rng, fixture, placements):
    mesh = request.getfixturevalue(fixture)
    X = randn(rng, 8, 16)
    x = jlm.distribute_tensor(X, mesh, placements)
    text = jlm.inspect.describe(x)
    assert text.splitlines()[0] == "float32[8, 16]"
    assert f"placements: {list(placements)}" in text
    assert f"PartitionSpec: {x.sharding.spec}" in text
    listed = rows(text)
    assert [d for d, *_ in listed] == [d.id for d in mesh.devices.flat]  # mesh order
    coords = [" ".join(f"{a}={c}" for a, c in zip(mesh.axis_names, idx, strict=True))
              for idx in np.ndindex(*mesh.devices.shape)]
    assert [c for _, c, *_ in listed] == coords
    held = {s.device.id: np.asarray(s.data) for s in x.addressable_shards}
    for device, _, slices, partial in listed:
        np.testing.assert_array_equal(held[device], X[slices])
        assert not partial


def test_partial_rows_are_summands(mesh2x4, rng):
    X = randn(rng, 4, 8)
    x = jlm.distribute_tensor(X, mesh2x4, [Partial(), Shard(1)])
    text = jlm.inspect.describe(x)
    assert "Partial over dp: each device holds a partial summand" in text
    listed = rows(text)
    assert all(partial for *_, partial in listed)
    held = {s.device.id: np.asarray(s.data) for s in x.addressable_shards}
    # the summands of each index range (one per dp coordinate) add up to X there
    for tp in range(4):
        same_range = [(device, slices) for device, coords, slices, _ in listed if coords.endswith(f"tp={tp}")]
        total = sum(held[device] for device, _ in same_range)
        np.testing.assert_allclose(total, X[same_range[0][1]], rtol=1e-6)


def test_single_device_and_auto_mesh(auto_mesh, rng):
    text = jlm.inspect.describe(jax.numpy.asarray(randn(rng, 3, 2)))
    assert "not on a mesh" in text and rows(text)[0][2] == (slice(0, 3), slice(0, 2))
    x = jax.device_put(randn(rng, 4, 8), NamedSharding(auto_mesh, P("dp", "tp")))
    text = jlm.inspect.describe(x)
    assert "dp=2 (Auto), tp=4 (Auto)" in text and "placements: [Shard(dim=0), Shard(dim=1)]" in text


def test_axes_out_of_mesh_order(mesh2x4, rng):
    x = jax.device_put(randn(rng, 8, 2), NamedSharding(mesh2x4, P(("tp", "dp"))))
    text = jlm.inspect.describe(x)
    assert "placements: none (a dim is split over mesh axes out of mesh order)" in text
    held = {s.device.id: np.asarray(s.data) for s in x.addressable_shards}
    for device, _, slices, _ in rows(text):
        np.testing.assert_array_equal(held[device], np.asarray(x)[slices])


def test_print_layout_plain(mesh1, rng):
    x = jlm.distribute_tensor(randn(rng, 4, 2), mesh1, [Shard(0)])
    out = io.StringIO()
    jlm.inspect.print_layout(x, use_rich=False, file=out)
    assert out.getvalue() == jlm.inspect.describe(x) + "\n"


def test_print_layout_rich(mesh1, rng):
    pytest.importorskip("rich")
    x = jlm.distribute_tensor(randn(rng, 4, 2), mesh1, [Shard(0)])
    out = io.StringIO()
    jlm.inspect.print_layout(x, use_rich=True, file=out)
    text = out.getvalue()
    assert "placements: [Shard(dim=0)]" in text
    assert re.search(r"1\s*│\s*tp=1\s*│\s*\[2:4, 0:2\]", text)


def test_errors(mesh1, rng):
    with pytest.raises(jlm.LocalMapTypeError, match=r"x: expected a jax.Array, found ndarray.*distribute_tensor"):
        jlm.inspect.describe(randn(rng, 2))
    x = jlm.distribute_tensor(randn(rng, 4), mesh1, [Shard(0)])
    with pytest.raises(jlm.LocalMapTypeError, match=r"x: expected a concrete jax.Array, found a tracer"):
        jax.jit(jlm.inspect.describe)(x)


def test_without_rich(mesh1, rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)  # how Python marks a module as missing
    x = jlm.distribute_tensor(randn(rng, 4, 2), mesh1, [Shard(0)])
    out = io.StringIO()
    jlm.inspect.print_layout(x, file=out)
    assert out.getvalue() == jlm.inspect.describe(x) + "\n"
    with pytest.raises(jlm.LocalMapValueError, match=r"use_rich: expected the optional package rich.*pip install rich"):
        jlm.inspect.print_layout(x, use_rich=True)
