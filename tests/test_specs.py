import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard
from jlocalmap.layouts.specs import local_shape


@pytest.mark.parametrize("placements, ndim, spec", [
    ([Replicate(), Replicate()], 2, P(None, None)),
    ([Shard(0), Replicate()], 2, P("dp", None)),
    ([Replicate(), Shard(1)], 2, P(None, "tp")),
    ([Shard(1), Shard(0)], 2, P("tp", "dp")),
    ([Shard(0), Shard(0)], 1, P(("dp", "tp"))),
    ([Shard(-1), Replicate()], 3, P(None, None, "dp")),
    ([Partial(), Shard(0)], 2, P("tp", None, unreduced={"dp"})),
    ([Partial("avg"), Partial()], 1, P(None, unreduced={"dp", "tp"})),
])
def test_round_trip(mesh2x4, placements, ndim, spec):
    got = jlm.placements_to_spec(placements, mesh2x4, ndim)
    assert got == spec
    back = jlm.spec_to_placements(got, mesh2x4)
    assert back == tuple(Partial("sum") if p.is_partial() else
                         Shard(p.dim % ndim) if p.is_shard() else p for p in placements)


def test_three_axis_mesh(mesh3d):
    spec = jlm.placements_to_spec([Shard(0), Shard(1), Shard(2)], mesh3d, 4)
    assert spec == P("dp", "tp", "cp", None)
    assert jlm.spec_to_placements(P(("dp", "cp"), "tp"), mesh3d) == (Shard(0), Shard(1), Shard(0))


def test_abstract_mesh_of_256_devices():
    mesh = AbstractMesh((8, 8, 4), ("dp", "tp", "cp"))
    assert local_shape((8, 16, 16, 6), [Shard(0), Shard(1), Shard(2)], mesh) == (1, 2, 4, 6)
    assert jlm.placements_to_spec([Shard(0), Shard(1), Replicate()], mesh, 4) == P("dp", "tp", None, None)


def test_wrong_length(mesh2x4):
    with pytest.raises(jlm.PlacementValueError, match=r"placements: expected 2 placements, one per mesh axis \('dp', 'tp'\), found 1"):
        jlm.placements_to_spec([Shard(0)], mesh2x4, 2)


def test_not_placements(mesh2x4):
    with pytest.raises(jlm.PlacementTypeError, match="expected a list or tuple of jlocalmap placements"):
        jlm.placements_to_spec(["S(0)", "R"], mesh2x4, 2)


def test_dim_out_of_range(mesh2x4):
    with pytest.raises(jlm.PlacementValueError, match=r"Shard\(dim=2\) is out of range for a value of rank 2"):
        jlm.placements_to_spec([Shard(2), Replicate()], mesh2x4, 2)


def test_max_partial_has_no_spec(mesh2x4):
    with pytest.raises(jlm.PlacementValueError, match=r"Partial\(max\).*no JAX layout"):
        jlm.placements_to_spec([Partial("max"), Replicate()], mesh2x4, 1)


def test_partial_needs_explicit_axes(auto_mesh):
    with pytest.raises(jlm.PlacementValueError, match="needs an Explicit axis"):
        jlm.placements_to_spec([Partial(), Replicate()], auto_mesh, 1)


def test_spec_order_other_than_mesh(mesh2x4):
    with pytest.raises(jlm.PlacementValueError, match="in an order other than the mesh's"):
        jlm.spec_to_placements(P(("tp", "dp")), mesh2x4)
    with pytest.raises(jlm.PlacementValueError, match="names mesh axis 'x'"):
        jlm.spec_to_placements(P("x"), mesh2x4)


def test_bad_mesh_type():
    with pytest.raises(jlm.PlacementTypeError, match="device_mesh: expected a jax.sharding.Mesh"):
        jlm.placements_to_spec([Shard(0)], "mesh", 1)


def test_uneven_is_a_clear_error(mesh2x4):
    with pytest.raises(jlm.PlacementValueError, match="does not divide evenly over mesh axis 'dp'"):
        local_shape((5, 4), [Shard(0), Replicate()], mesh2x4)


@pytest.mark.parametrize("spec", [P("dp", "dp"), P(("tp", "tp")), P("tp", None, ("dp", "tp"))])
def test_the_same_mesh_axis_twice(mesh2x4, spec):
    with pytest.raises(jlm.PlacementValueError, match=r"spec: mesh axis '\w+' appears twice in P\(.*Name each axis once"):
        jlm.spec_to_placements(spec, mesh2x4)
