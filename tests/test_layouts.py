"""distribute_tensor, redistribute, placements_of and full_tensor on 1-, 2- and
3-axis meshes, each value checked against the numpy global array."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from jlocalmap.layouts.uneven import UnevenArray
from helpers import assert_close, count_collectives, randn
from jlocalmap import Partial, Replicate, Shard

NONE = {"all-reduce": 0, "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0,
        "collective-permute": 0}


def stored(placements):
    """The placements a value reads back as: Partial('avg') is stored as sums and
    negative dims are normalized (rank-2 values here)."""
    return tuple(Partial() if p.is_partial() else Shard(p.dim % 2) if p.is_shard() else p
                 for p in placements)


def summands(x, mesh):
    """The per-device stored values of ``x``, stacked over its unreduced axes
    (read with a no-data-movement shard_map, since ``addressable_shards`` does not
    always work on unreduced arrays)."""
    spec = x.sharding.spec
    axes = tuple(a for a in mesh.axis_names if a in spec.unreduced)
    stack = jax.shard_map(lambda u: u[None], mesh=mesh, in_specs=spec,
                          out_specs=P(axes, *spec.partitions), check_vma=False)
    return np.asarray(stack(x))


def shard_of(x, device):
    (shard,) = [s for s in x.addressable_shards if s.device == device]
    return np.asarray(shard.data)


# -- every source x destination on a 1-axis mesh ------------------------------------
ONE_AXIS = [Shard(0), Shard(1), Replicate(), Partial(), Partial("avg")]


@pytest.mark.parametrize("dst", ONE_AXIS, ids=repr)
@pytest.mark.parametrize("src", ONE_AXIS, ids=repr)
def test_redistribute_1d_all_pairs(mesh4, rng, src, dst):
    X = randn(rng, 8, 12)
    x = jlm.distribute_tensor(X, mesh4, [src])
    assert jlm.placements_of(x) == stored([src])
    assert_close(jlm.full_tensor(x), X)
    y = jlm.redistribute(x, mesh4, [dst])
    assert jlm.placements_of(y) == stored([dst])
    assert y.shape == X.shape
    assert_close(jlm.full_tensor(y), X)
    if not dst.is_partial():
        assert_close(y, X)
        want = X if dst.is_replicate() else np.split(X, 4, axis=dst.dim % 2)[1]
        assert_close(shard_of(y, mesh4.devices[1]), want)


# -- 2- and 3-axis meshes -------------------------------------------------------------
S0, S1, R, PS, PA = Shard(0), Shard(1), Replicate(), Partial(), Partial("avg")

TWO_AXIS_PAIRS = [
    ([S0, S1], [R, R]), ([S0, S1], [S0, S0]), ([S0, S0], [S1, S1]), ([S0, S0], [R, S0]),
    ([R, R], [S1, S0]), ([R, R], [PS, PS]), ([R, S1], [R, PA]), ([PS, R], [R, R]),
    ([PS, R], [S1, S0]), ([R, PS], [S0, S0]), ([PS, PS], [S0, S1]),
    ([PA, S0], [R, S1]), ([PS, PS], [PA, PS]), ([S1, PA], [PS, R]), ([Shard(-1), Shard(-2)], [S0, S1]),
    pytest.param([PS, R], [PS, PS]),
    pytest.param([R, PS], [PS, PS]),
    pytest.param([PS, S0], [PS, PA]),
]


@pytest.mark.parametrize("src, dst", TWO_AXIS_PAIRS, ids=repr)
def test_redistribute_2d_pairs(mesh2x4, rng, src, dst):
    X = randn(rng, 8, 16)
    x = jlm.distribute_tensor(X, mesh2x4, src)
    assert jlm.placements_of(x) == stored(src)
    y = jlm.redistribute(x, mesh2x4, dst)
    assert jlm.placements_of(y) == stored(dst)
    assert_close(jlm.full_tensor(y), X)


@pytest.mark.parametrize("src, dst", [
    ([S0, S1, Shard(2)], [Shard(2), Shard(2), Shard(2)]),
    ([R, S0, R], [PS, Shard(2), PA]),
    ([PS, Shard(2), PA], [S0, R, S1]),
    ([PS, PS, PS], [R, R, R]),
    ([R, R, R], [S1, PS, Shard(-3)]),
    pytest.param([PS, Shard(2), PA], [PS, PS, PS]),
], ids=repr)
def test_redistribute_3d(mesh3d, rng, src, dst):
    X = randn(rng, 4, 8, 8)

    def canon(pl):
        return tuple(Partial() if p.is_partial() else Shard(p.dim % 3) if p.is_shard() else p
                     for p in pl)

    x = jlm.distribute_tensor(X, mesh3d, src)
    assert jlm.placements_of(x) == canon(src)
    assert_close(jlm.full_tensor(x), X)
    y = jlm.redistribute(x, mesh3d, dst)
    assert jlm.placements_of(y) == canon(dst)
    assert_close(jlm.full_tensor(y), X)


def test_redistribute_with_mesh_none_uses_own_mesh(mesh2x2, rng):
    X = randn(rng, 4, 6)
    x = jlm.distribute_tensor(X, mesh2x2, [Shard(0), Partial()])
    y = jlm.redistribute(x, None, [Replicate(), Shard(1)])
    assert jlm.placements_of(y) == (Replicate(), Shard(1))
    assert_close(y, X)


# -- the same tensor dim on several mesh axes -------------------------------------------
def test_shard_same_dim_on_two_axes_outer_is_earlier(mesh2x4, rng):
    X = randn(rng, 16, 3)
    x = jlm.distribute_tensor(X, mesh2x4, [Shard(0), Shard(0)])
    assert x.sharding.spec == P(("dp", "tp"), None)
    assert jlm.placements_of(x) == (Shard(0), Shard(0))
    chunks = np.split(X, 8)
    for i, j in [(0, 0), (0, 3), (1, 2), (1, 0)]:  # device (dp=i, tp=j) holds chunk 4 i + j
        assert_close(shard_of(x, mesh2x4.devices[i, j]), chunks[4 * i + j])
    assert_close(x, X)
    y = jlm.redistribute(x, mesh2x4, [Replicate(), Shard(0)])
    assert_close(shard_of(y, mesh2x4.devices[1, 2]), np.split(X, 4)[2])
    z = jlm.redistribute(y, mesh2x4, [Shard(0), Shard(0)])
    assert_close(shard_of(z, mesh2x4.devices[1, 2]), chunks[6])


def test_shard_same_dim_on_three_axes(mesh3d, rng):
    X = randn(rng, 8, 5)
    x = jlm.distribute_tensor(X, mesh3d, [Shard(0)] * 3)
    assert x.sharding.spec == P(("dp", "tp", "cp"), None)
    chunks = np.split(X, 8)
    assert_close(shard_of(x, mesh3d.devices[1, 0, 1]), chunks[5])
    assert_close(shard_of(x, mesh3d.devices[0, 1, 1]), chunks[3])


def test_two_dims_on_three_axes_device_shard(mesh3d, rng):
    X = randn(rng, 4, 8)
    # dim 1 split by (dp, cp) in mesh order, dim 0 by tp
    x = jlm.distribute_tensor(X, mesh3d, [Shard(1), Shard(0), Shard(1)])
    assert x.sharding.spec == P("tp", ("dp", "cp"))
    i, j, k = 1, 0, 1
    want = np.split(np.split(X, 2, axis=0)[j], 4, axis=1)[2 * i + k]
    assert_close(shard_of(x, mesh3d.devices[i, j, k]), want)


# -- negative dims --------------------------------------------------------------------
def test_negative_dims(mesh2x4, rng):
    X = randn(rng, 8, 4)
    x = jlm.distribute_tensor(X, mesh2x4, [Shard(-1), Shard(-2)])
    assert x.sharding.spec == P("tp", "dp")
    assert jlm.placements_of(x) == (Shard(1), Shard(0))
    assert_close(shard_of(x, mesh2x4.devices[1, 3]), np.split(np.split(X, 4)[3], 2, axis=1)[1])
    y = jlm.redistribute(x, mesh2x4, [Shard(-2), Replicate()])
    assert y.sharding.spec == P("dp", None)
    assert_close(y, X)


# -- Partial round trip ----------------------------------------------------------------
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_partial_round_trip_1d(mesh4, rng, op):
    X = randn(rng, 4, 6)
    x = jlm.distribute_tensor(X, mesh4, [Partial(op)])
    assert x.sharding.spec.unreduced == {"tp"}
    assert_close(jlm.full_tensor(x), X)
    assert_close(jlm.redistribute(x, mesh4, [Replicate()]), X)
    s = summands(x, mesh4)
    assert s.shape == (4, 4, 6)
    assert_close(s.sum(0), X)
    assert_close(s, np.broadcast_to(X / 4, s.shape))  # DTensor's split: value / n each


def test_partial_addressable_shards_sum_to_global(mesh1, rng):
    X = randn(rng, 4, 6)
    x = jlm.distribute_tensor(X, mesh1, [Partial()])
    try:
        parts = [np.asarray(s.data) for s in x.addressable_shards]
    except NotImplementedError:  # JAX may refuse to index unreduced arrays
        pytest.skip("addressable_shards of unreduced arrays not supported by this jax")
    assert len(parts) == 2 and all(p.shape == X.shape for p in parts)
    assert_close(sum(parts), X)


def test_partial_round_trip_2d(mesh2x4, rng):
    X = randn(rng, 8, 6)
    x = jlm.distribute_tensor(X, mesh2x4, [Partial(), Shard(0)])
    assert x.sharding.spec == P("tp", None, unreduced={"dp"})
    assert_close(jlm.full_tensor(x), X)
    s = summands(x, mesh2x4)
    assert s.shape == (2, 8, 6)
    assert_close(s.sum(0), X)
    y = jlm.redistribute(x, mesh2x4, [Replicate(), Shard(0)])
    assert jlm.placements_of(y) == (Replicate(), Shard(0))
    assert_close(y, X)


def test_partial_round_trip_3d(mesh3d, rng):
    X = randn(rng, 4, 4, 8)
    x = jlm.distribute_tensor(X, mesh3d, [Partial(), Shard(2), Partial("avg")])
    assert x.sharding.spec == P(None, None, "tp", unreduced={"dp", "cp"})
    assert jlm.placements_of(x) == (Partial(), Shard(2), Partial())
    assert_close(jlm.full_tensor(x), X)
    s = summands(x, mesh3d)
    assert s.shape == (4, 4, 4, 8)
    assert_close(s.sum(0), X)
    assert_close(jlm.redistribute(x, mesh3d, [Shard(0), Replicate(), Shard(1)]), X)


def test_partial_scalar(mesh1):
    x = jlm.distribute_tensor(3.5, mesh1, [Partial()])
    assert jlm.placements_of(x) == (Partial(),)
    assert_close(jlm.full_tensor(x), 3.5)


def test_partial_on_axis_of_size_one_is_replicate(rng):
    mesh = jax.make_mesh((1, 2), ("dp", "tp"))
    X = randn(rng, 4, 2)
    x = jlm.distribute_tensor(X, mesh, [Partial(), Shard(0)])
    assert jlm.placements_of(x) == (Replicate(), Shard(0))
    assert_close(x, X)


# -- collectives ---------------------------------------------------------------------
@pytest.mark.parametrize("mesh_name, src, dst, expected", [
    ("mesh4", [Partial()], [Replicate()], {"all-reduce": 1}),
    ("mesh4", [Partial("avg")], [Replicate()], {"all-reduce": 1}),
    ("mesh4", [Shard(0)], [Replicate()], {"all-gather": 1}),
    ("mesh4", [Shard(1)], [Replicate()], {"all-gather": 1}),
    ("mesh4", [Replicate()], [Shard(0)], {}),
    ("mesh4", [Replicate()], [Shard(1)], {}),
    ("mesh4", [Shard(0)], [Shard(0)], {}),
    ("mesh2x4", [Partial(), Shard(0)], [Replicate(), Shard(0)], {"all-reduce": 1}),
    ("mesh2x4", [Shard(0), Partial()], [Shard(0), Replicate()], {"all-reduce": 1}),
    ("mesh2x4", [Replicate(), Shard(1)], [Replicate(), Replicate()], {"all-gather": 1}),
    ("mesh2x4", [Replicate(), Replicate()], [Shard(0), Shard(1)], {}),
    ("mesh2x4", [Replicate(), Replicate()], [Shard(0), Shard(0)], {}),
], ids=repr)
def test_redistribute_collectives(request, rng, mesh_name, src, dst, expected):
    mesh = request.getfixturevalue(mesh_name)
    X = randn(rng, 8, 8)
    x = jlm.distribute_tensor(X, mesh, src)
    with jax.set_mesh(mesh):
        counts = count_collectives(lambda x: jlm.redistribute(x, mesh, dst), x)
    assert counts == {**NONE, **expected}


# -- jit and eager agree ----------------------------------------------------------------
@pytest.mark.parametrize("src, dst", [
    ([Shard(0), Shard(1)], [Replicate(), Shard(0)]),
    ([Partial(), Shard(1)], [Shard(0), Replicate()]),
    ([Replicate(), Replicate()], [Shard(1), Partial()]),
    ([Shard(0), Shard(0)], [Shard(1), Shard(1)]),
    ([Partial("avg"), Partial()], [Replicate(), Replicate()]),
], ids=repr)
def test_redistribute_jit_matches_eager(mesh2x2, rng, src, dst):
    X = randn(rng, 4, 8)
    x = jlm.distribute_tensor(X, mesh2x2, src)
    eager = jlm.redistribute(x, mesh2x2, dst)
    with jax.set_mesh(mesh2x2):
        jitted = jax.jit(lambda x: jlm.redistribute(x, mesh2x2, dst))(x)
    assert jitted.sharding.spec == eager.sharding.spec
    assert jlm.placements_of(jitted) == jlm.placements_of(eager) == stored(dst)
    np.testing.assert_array_equal(np.asarray(jlm.full_tensor(jitted)),
                                  np.asarray(jlm.full_tensor(eager)))
    assert_close(jlm.full_tensor(jitted), X)


@pytest.mark.parametrize("placements", [
    [Shard(1), Shard(0)], [Replicate(), Partial()], [Shard(0), Shard(0)], [Partial("avg"), Shard(-1)],
], ids=repr)
def test_distribute_tensor_jit_matches_eager(mesh2x2, rng, placements):
    X = randn(rng, 4, 8)
    eager = jlm.distribute_tensor(X, mesh2x2, placements)
    with jax.set_mesh(mesh2x2):
        jitted = jax.jit(lambda a: jlm.distribute_tensor(a, mesh2x2, placements))(X)
    assert jitted.sharding.spec == eager.sharding.spec
    assert_close(jlm.full_tensor(jitted), X)
    assert_close(jlm.full_tensor(eager), X)


def test_full_tensor_under_jit(mesh2x4, rng):
    X = randn(rng, 8, 4)
    x = jlm.distribute_tensor(X, mesh2x4, [Partial(), Shard(0)])
    with jax.set_mesh(mesh2x4):
        y = jax.jit(jlm.full_tensor)(x)
    assert jlm.placements_of(y) == (Replicate(), Replicate())
    assert_close(y, X)


def test_distribute_tensor_jit_without_mesh_context(mesh1, rng):
    X = randn(rng, 4, 6)
    y = jax.jit(lambda a: jlm.distribute_tensor(a, mesh1, [Shard(0)]))(X)
    assert jlm.placements_of(y) == (Shard(0),)
    assert_close(y, X)


def test_distribute_an_already_distributed_value(mesh2x4, mesh3d, rng):
    X = randn(rng, 8, 4)
    x = jlm.distribute_tensor(X, mesh2x4, [Shard(0), Partial()])
    y = jlm.distribute_tensor(x, mesh2x4, [Replicate(), Shard(1)])
    assert jlm.placements_of(y) == (Replicate(), Shard(1))
    assert_close(y, X)
    z = jlm.distribute_tensor(x, mesh3d, [Shard(1), Shard(0), Replicate()])
    assert jlm.placements_of(z) == (Shard(1), Shard(0), Replicate())
    assert_close(z, X)


# -- placements_of --------------------------------------------------------------------
def test_placements_of_tracers_under_jit(mesh2x4, rng):
    seen = []
    x = jlm.distribute_tensor(randn(rng, 8, 4), mesh2x4, [Shard(1), Shard(0)])
    p = jlm.distribute_tensor(randn(rng, 8, 4), mesh2x4, [Partial(), Replicate()])

    def f(x, p):
        seen.append((jlm.placements_of(x), jlm.placements_of(p), jlm.placements_of(x, mesh2x4)))
        y = jlm.redistribute(x, mesh2x4, [Shard(0), Shard(0)])
        seen.append(jlm.placements_of(y))
        return y

    with jax.set_mesh(mesh2x4):
        jax.jit(f)(x, p)
    assert seen == [((Shard(1), Shard(0)), (Partial(), Replicate()), (Shard(1), Shard(0))),
                    (Shard(0), Shard(0))]


def test_placements_of_auto_mesh_eager(auto_mesh, rng):
    x = jax.device_put(randn(rng, 8, 4), NamedSharding(auto_mesh, P("tp", "dp")))
    assert jlm.placements_of(x) == (Shard(1), Shard(0))
    y = jlm.distribute_tensor(randn(rng, 8, 4), auto_mesh, [Shard(0), Replicate()])
    assert jlm.placements_of(y) == (Shard(0), Replicate())


def test_placements_of_auto_mesh_tracer_error(auto_mesh, rng):
    x = jax.device_put(randn(rng, 8, 4), NamedSharding(auto_mesh, P("dp", "tp")))
    with pytest.raises(jlm.PlacementValueError,
                       match=r"x: its placements on Auto-axis mesh .* are not known under "
                             r"jax\.jit; use a mesh with Explicit axes"):
        jax.jit(jlm.placements_of)(x)


@pytest.mark.parametrize("value", [np.ones((2, 2), np.float32), 1.5, 3], ids=["numpy", "float", "int"])
def test_placements_of_host_value_error(value):
    with pytest.raises(jlm.PlacementValueError,
                       match=r"x: expected a value distributed on a mesh .* found \w+ with no "
                             r"mesh; place it first with jlocalmap\.distribute_tensor"):
        jlm.placements_of(value)


def test_placements_of_wrong_mesh_error(mesh2x4, mesh3d, rng):
    x = jlm.distribute_tensor(randn(rng, 8, 4), mesh2x4, [Shard(0), Replicate()])
    with pytest.raises(jlm.PlacementValueError,
                       match=r"device_mesh: x lives on .*not on the given .*pass x's own mesh"):
        jlm.placements_of(x, mesh3d)


# -- full_tensor ---------------------------------------------------------------------
def test_full_tensor_of_host_values_unchanged(rng):
    X = randn(rng, 3, 5)
    out = jlm.full_tensor(X)
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), X)
    assert int(jlm.full_tensor(3)) == 3
    np.testing.assert_array_equal(np.asarray(jax.jit(jlm.full_tensor)(X)), X)


@pytest.mark.parametrize("value", ["abc", [1.0, 2.0], None], ids=["str", "list", "None"])
def test_full_tensor_of_non_array_error(value):
    with pytest.raises(jlm.LocalMapTypeError,
                       match=r"x: expected an array, found \w+; full_tensor takes what "
                             r"local_map or distribute_tensor returned"):
        jlm.full_tensor(value)


# -- errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("placements, found", [
    ([Shard(0)], 1), ([Shard(0), Replicate(), Replicate()], 3), ([], 0)], ids=["1", "3", "0"])
def test_wrong_placement_count(mesh2x4, rng, placements, found):
    X = randn(rng, 8, 8)
    msg = (rf"placements: expected 2 placements, one per mesh axis \('dp', 'tp'\), found {found}"
           r".*give one Shard\(d\), Replicate\(\) or Partial\(\) per mesh axis")
    with pytest.raises(jlm.PlacementValueError, match=msg):
        jlm.distribute_tensor(X, mesh2x4, placements)
    x = jlm.distribute_tensor(X, mesh2x4, [Replicate(), Replicate()])
    with pytest.raises(jlm.PlacementValueError, match=msg):
        jlm.redistribute(x, mesh2x4, placements)


@pytest.mark.parametrize("placements", ["Shard(0)", None, 0, [Shard(0), "R"]],
                         ids=["str", "None", "int", "mixed"])
def test_placements_not_a_list_of_placements(mesh2x2, rng, placements):
    with pytest.raises(jlm.PlacementTypeError,
                       match=r"placements: expected a list or tuple of jlocalmap placements "
                             r".*one per mesh axis \('dp', 'tp'\).*write e\.g\. "
                             r"\[Replicate\(\), Replicate\(\)\]"):
        jlm.distribute_tensor(randn(rng, 4, 4), mesh2x2, placements)


@pytest.mark.parametrize("shape, placements, dim, size", [
    ((6, 4), [Replicate(), Shard(0)], 0, 4),
    ((8, 6), [Shard(0), Shard(1)], 1, 4),
    ((12, 4), [Shard(0), Shard(0)], 0, 4),  # 12 / 2 = 6, then 6 over 4
    ((4, 3), [Shard(1), Replicate()], 1, 2),
], ids=["tp", "dim1", "after-earlier-split", "dp"])
def test_non_divisible_shapes_are_uneven(mesh2x4, rng, shape, placements, dim, size):
    X = randn(rng, *shape)
    x = jlm.distribute_tensor(X, mesh2x4, placements)
    assert isinstance(x, UnevenArray) and x.shape == shape
    assert jlm.placements_of(x) == tuple(placements)
    assert_close(jlm.full_tensor(x), X)
    y = jlm.redistribute(jlm.distribute_tensor(X, mesh2x4, [Replicate(), Replicate()]), mesh2x4, placements)
    assert_close(jlm.full_tensor(y), X)


@pytest.mark.parametrize("dim", [2, -3])
def test_shard_dim_out_of_range(mesh1, rng, dim):
    with pytest.raises(jlm.PlacementValueError,
                       match=rf"placements: Shard\(dim={dim}\) is out of range for a value of "
                             r"rank 2 \(valid dims are -2\.\.1\); shard an existing dim or use "
                             r"Replicate\(\)"):
        jlm.distribute_tensor(randn(rng, 4, 4), mesh1, [Shard(dim)])


@pytest.mark.parametrize("src", [
    [Replicate()], [Shard(0)],
    [Partial()],
], ids=repr)
@pytest.mark.parametrize("op", ["max", "min"])
def test_partial_max_min_target(mesh1, rng, op, src):
    msg = (rf"placements: Partial\({op}\) on mesh axis 'tp' has no JAX layout.*reduce it "
           r"first \(redistribute to Replicate\(\)\) or use Partial\('sum'\)")
    X = randn(rng, 4, 4)
    with pytest.raises(jlm.PlacementValueError, match=msg):
        jlm.distribute_tensor(X, mesh1, [Partial(op)])
    x = jlm.distribute_tensor(X, mesh1, src)
    with pytest.raises(jlm.PlacementValueError, match=msg):
        jlm.redistribute(x, mesh1, [Partial(op)])


def test_partial_on_auto_mesh(auto_mesh, rng):
    with pytest.raises(jlm.PlacementValueError,
                       match=r"placements: Partial\(\) on mesh axis 'dp' needs an Explicit axis"
                             r".*AxisType\.Explicit"):
        jlm.distribute_tensor(randn(rng, 8, 4), auto_mesh, [Partial(), Replicate()])


@pytest.mark.parametrize("mesh", ["tp", [0, 1], None, 2], ids=["str", "list", "None", "int"])
def test_bad_mesh_type(rng, mesh1, mesh):
    msg = (r"device_mesh: expected a jax\.sharding\.Mesh or AbstractMesh, found \w+; build one "
           r"with jax\.make_mesh")
    X = randn(rng, 4, 4)
    with pytest.raises(jlm.PlacementTypeError, match=msg):
        jlm.distribute_tensor(X, mesh, [Replicate()])
    if mesh is not None:  # None means "x's own mesh" for redistribute
        x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
        with pytest.raises(jlm.PlacementTypeError, match=msg):
            jlm.redistribute(x, mesh, [Replicate()])
        with pytest.raises(jlm.PlacementTypeError, match=msg):
            jlm.placements_of(x, mesh)


def test_redistribute_onto_another_mesh_error(mesh2x4, mesh3d, rng):
    x = jlm.distribute_tensor(randn(rng, 8, 4), mesh2x4, [Shard(0), Replicate()])
    with pytest.raises(jlm.PlacementValueError,
                       match=r"device_mesh: x lives on .*not on the given .*pass x's own mesh "
                             r"or move x with jax\.device_put"):
        jlm.redistribute(x, mesh3d, [Replicate()] * 3)


def test_redistribute_host_value_error(mesh1, rng):
    with pytest.raises(jlm.PlacementValueError,
                       match=r"x: expected a value distributed on a mesh.*jlocalmap\.distribute_tensor"):
        jlm.redistribute(randn(rng, 4, 4), mesh1, [Replicate()])


def test_error_classes():
    # placement errors are the placement cases of the two kinds: an except clause for
    # either the old or the new name catches them
    assert issubclass(jlm.PlacementValueError, jlm.LocalMapValueError)
    assert issubclass(jlm.PlacementTypeError, jlm.LocalMapTypeError)
    assert issubclass(jlm.LocalMapValueError, ValueError)
    assert issubclass(jlm.LocalMapTypeError, TypeError)
    assert issubclass(jlm.LocalMapValueError, jlm.LocalMapError)
    assert issubclass(jlm.LocalMapTypeError, jlm.LocalMapError)
    assert not issubclass(jlm.LocalMapValueError, jlm.PlacementValueError)
