"""Uneven shards (REFERENCE s3): DTensor's chunk sizes, values equal to the
unsharded computation, padding that never changes a result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from helpers import assert_close, randn
from jlocalmap import Partial, Replicate, Shard
from jlocalmap.layouts.chunks import chunk_bounds
from jlocalmap.layouts.uneven import UnevenArray, local_valid_size


@pytest.mark.parametrize("size, splits, lengths", [
    (5, [2], [3, 2]), (9, [2], [5, 4]), (9, [4], [3, 3, 3, 0]), (9, [2, 2], [3, 2, 2, 2]),
    (3, [4], [1, 1, 1, 0]), (8, [4], [2, 2, 2, 2]), (0, [2], [0, 0]),
])
def test_chunk_sizes_are_torch_chunk(size, splits, lengths):
    bounds = chunk_bounds(size, splits)
    assert [n for _, n in bounds] == lengths
    assert sum(lengths) == size
    assert [s for s, _ in bounds] == list(np.cumsum([0] + lengths[:-1]))


def test_five_rows_over_two_devices(mesh1, rng):
    X = randn(rng, 5, 4)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    assert isinstance(x, UnevenArray) and x.shape == (5, 4)
    assert [s.data.shape for s in x.padded.addressable_shards] == [(3, 4), (3, 4)]
    seen = []

    def rowwise(x):
        seen.append(x.shape)
        return jnp.tanh(x) * 2 + 1

    y = jlm.local_map(rowwise, [Shard(0)], ([Shard(0)],))(x)
    assert seen[-1] == (3, 4)
    assert isinstance(y, UnevenArray) and y.shape == (5, 4)
    assert jlm.placements_of(y) == (Shard(0),)
    assert_close(jlm.full_tensor(y), np.tanh(X) * 2 + 1)


def test_nine_by_five_over_a_2x2_mesh_times_a_scalar(mesh2x2, rng):
    X = randn(rng, 9, 5)
    pl = [Shard(0), Shard(1)]
    x = jlm.distribute_tensor(X, mesh2x2, pl)
    y = jlm.local_map(lambda x, s: x * s, [pl], (pl, None))(x, 3.0)
    assert_close(jlm.full_tensor(y), 3 * X)
    # DTensor's chunks: rows 5 + 4, columns 3 + 2
    valid = {(int(d.id)): s for d, s in zip(mesh2x2.devices.flat, [(5, 3), (5, 2), (4, 3), (4, 2)], strict=True)}
    assert len(valid) == 4


def test_host_value_with_uneven_placements(mesh4, rng):
    X = randn(rng, 6, 3)
    y = jlm.local_map(lambda x: x - 1, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)(X)
    assert y.shape == (6, 3)
    assert_close(jlm.full_tensor(y), X - 1)


def test_nested_axes_on_one_dim(mesh2x2, rng):
    X = randn(rng, 9, 2)
    pl = [Shard(0), Shard(0)]
    x = jlm.distribute_tensor(X, mesh2x2, pl)
    y = jlm.local_map(lambda x: x ** 2, [pl], (pl,))(x)
    assert_close(jlm.full_tensor(y), X ** 2)


def test_gradients_through_uneven_inputs(mesh1, rng):
    X, W = randn(rng, 5, 4), randn(rng, 4, 3)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    f = jlm.local_map(lambda x, w: jnp.sin(x @ w), [Shard(0)], ([Shard(0)], [Replicate()]))
    with jax.set_mesh(mesh1):
        gw = jax.jit(jax.grad(lambda w: (jlm.full_tensor(f(x, w)) ** 2).sum()))(w)
    assert_close(gw, jax.grad(lambda w: (jnp.sin(X @ w) ** 2).sum())(W), rtol=1e-4)


def test_a_body_mixing_padding_rows_is_refused(mesh1, rng):
    x = jlm.distribute_tensor(randn(rng, 5, 4), mesh1, [Shard(0)])
    f = jlm.local_map(lambda x: jax.lax.psum(x.sum(0), "tp"), [Replicate()], ([Shard(0)],))
    with pytest.raises(jlm.PlacementValueError, match=r"out_placements\[0\]: output 0 changes with the padding.*local_valid_size"):
        f(x)


def test_masked_reduction_is_exact(mesh1, rng):
    X = randn(rng, 5, 4)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])

    def masked_sum(x):
        rows = jnp.arange(x.shape[0])[:, None] < local_valid_size(5, "tp")
        return jax.lax.psum(jnp.where(rows, x, 0).sum(0), "tp")

    y = jlm.local_map(masked_sum, [Replicate()], ([Shard(0)],))(x)
    assert_close(y, X.sum(0), rtol=1e-5)


def test_outputs_that_cannot_be_mapped_back(mesh1, rng):
    x = jlm.distribute_tensor(randn(rng, 5, 4), mesh1, [Shard(0)])
    f = jlm.local_map(lambda x: x[:-1], [Shard(0)], ([Shard(0)],))
    with pytest.raises(jlm.PlacementValueError, match=r"out_placements\[0\]: output 0 is sharded over \('tp',\) on dim 0 like an uneven input, but its local length 2 matches no uneven input"):
        f(x)


def test_redistribute_uneven(mesh2x2, rng):
    X = randn(rng, 9, 5)
    x = jlm.distribute_tensor(X, mesh2x2, [Shard(0), Shard(1)])
    for pl in ([Replicate(), Shard(0)], [Shard(1), Replicate()], [Replicate(), Replicate()]):
        assert_close(jlm.full_tensor(jlm.redistribute(x, mesh2x2, pl)), X)
    f = jlm.local_map(lambda x: x + 1, [Shard(1), Shard(0)], ([Shard(1), Shard(0)],), redistribute_inputs=True)
    assert_close(jlm.full_tensor(f(x)), X + 1)
    with pytest.raises(jlm.PlacementValueError, match="set redistribute_inputs=True"):
        jlm.local_map(lambda x: x, [Shard(1), Shard(0)], ([Shard(1), Shard(0)],))(x)


def test_partial_output_of_uneven_input(mesh1, rng):
    X = randn(rng, 5, 4)
    x = jlm.distribute_tensor(X, mesh1, [Shard(1)])
    y = jlm.local_map(lambda x: x * 2, [Shard(1)], ([Shard(1)],))(x)
    assert_close(jlm.full_tensor(y), 2 * X)
    z = jlm.distribute_tensor(randn(rng, 3, 3), mesh1, [Shard(0), ][:1])
    assert jlm.placements_of(z) == (Shard(0),)
    assert isinstance(jlm.distribute_tensor(X, mesh1, [Partial()]), jax.Array)


def test_uneven_host_input_beside_an_even_one(mesh4, rng):
    X, Y = randn(rng, 8, 3), randn(rng, 9, 3)
    x = jlm.distribute_tensor(X, mesh4, [Shard(0)])
    out = jlm.local_map(lambda x, y: (x[:, :1] * 2, y + 1), ([Shard(0)], [Shard(0)]),
                        ([Shard(0)], [Shard(0)]))(x, Y)
    assert_close(out[0], 2 * X[:, :1])
    assert_close(jlm.full_tensor(out[1]), Y + 1)


def test_ambiguous_chunk_lengths_are_refused(mesh4, rng):
    """8 rows and 6 rows over 4 devices both have chunks of 2."""
    x = jlm.distribute_tensor(randn(rng, 8, 3), mesh4, [Shard(0)])
    f = jlm.local_map(lambda x, y: (x * 2, y + 1), ([Shard(0)], [Shard(0)]), ([Shard(0)], [Shard(0)]))
    with pytest.raises(jlm.PlacementValueError, match=r"out_placements\[0\]: output 0's dim 0, split over \('tp',\) in chunks of 2, could be an even input's rows or an uneven input's \(of \[6\] rows\)"):
        f(x, randn(rng, 6, 3))


def test_even_input_redistributed_to_an_uneven_layout(mesh4, rng):
    X = randn(rng, 4, 6)
    x = jlm.distribute_tensor(X, mesh4, [Shard(0)])
    f = jlm.local_map(lambda x: x * 3, [Shard(1)], ([Shard(1)],), redistribute_inputs=True)
    assert_close(jlm.full_tensor(f(x)), 3 * X)


# -- no hidden runs of the body (the padding guarantee read from the jaxpr) -----------
def _compiles_of_first_call(mesh, rows, jit):
    events = []

    def listen(name, secs, **kwargs):
        if name.endswith("backend_compile_duration"):
            events.append(name)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        X = np.random.default_rng(rows).standard_normal((rows, 3)).astype(np.float32)
        x = jlm.distribute_tensor(X, mesh, [Shard(0)])
        f = jlm.local_map(lambda v: jnp.sin(v) * 2, [Shard(0)], ([Shard(0)],), device_mesh=mesh)
        jax.block_until_ready(x.padded if isinstance(x, UnevenArray) else x)
        before = len(events)
        y = jax.block_until_ready(jax.jit(f)(x) if jit else f(x))
        compiled = len(events) - before
        assert_close(jlm.full_tensor(y), np.sin(X) * 2)
        return compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_an_uneven_first_call_compiles_what_an_even_one_does(mesh4, jit):
    even = _compiles_of_first_call(mesh4, 8 + 4 * jit, jit)
    uneven = _compiles_of_first_call(mesh4, 7 + 4 * jit, jit)
    assert even == uneven == 1, (even, uneven)   # main before: 1 and 6


def test_an_uneven_first_call_runs_the_body_on_the_data_only(mesh4, rng):
    X = randn(rng, 7, 3)
    seen = []
    f = jlm.local_map(lambda v: v + jax.pure_callback(lambda a: (seen.append(a.copy()), a)[1],
                                                      jax.ShapeDtypeStruct(v.shape, v.dtype), v),
                      [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    y = f(jlm.distribute_tensor(X, mesh4, [Shard(0)]))
    assert_close(jlm.full_tensor(y), 2 * X)
    # One run per device (in any order), on X's rows and the zero padding only.
    rows = [r for a in seen for r in np.asarray(a)]
    assert len(seen) == 4 and len(rows) == 8
    assert sorted(map(tuple, X)) == sorted(tuple(r) for r in rows if r.any())


def _loop_sum(x):
    # A while loop: an operation the jaxpr reading does not follow (it cannot tell).
    return jax.lax.fori_loop(0, 1, lambda i, v: v + v.sum(0), x)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_check_padding_runs_the_region_where_the_jaxpr_cannot_tell(mesh4, rng, jit):
    x = jlm.distribute_tensor(randn(rng, 7, 3), mesh4, [Shard(0)])
    unchecked = jlm.local_map(_loop_sum, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    assert isinstance(unchecked(x), UnevenArray)      # not refused: nothing ran to see it
    checked = jlm.local_map(_loop_sum, [Shard(0)], ([Shard(0)],), device_mesh=mesh4,
                            check_padding=True)
    with pytest.raises(jlm.PlacementValueError, match=r"output 0 changes with the padding"):
        (jax.jit(checked) if jit else checked)(x)


@pytest.mark.parametrize("body", [
    lambda x: x.sum(0, keepdims=True) + x,             # a sum over the padded rows
    lambda x: jnp.cumsum(x, 0),                        # a running sum along them
    lambda x: jnp.roll(x, 1, 0),                       # a shift
    lambda x: x - x.max(0),                            # a max over them
    lambda x: x @ (x.T @ x),                           # a contraction over them
], ids=["sum", "cumsum", "roll", "max", "contraction"])
def test_bodies_mixing_padding_rows_are_refused_from_the_jaxpr(mesh4, rng, body):
    x = jlm.distribute_tensor(randn(rng, 7, 3), mesh4, [Shard(0)])
    f = jlm.local_map(body, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    with pytest.raises(jlm.PlacementValueError, match=r"output 0 changes with the padding"):
        f(x)


@pytest.mark.parametrize("body, expected", [
    (lambda x, w: jnp.tanh(x @ w), lambda X, W: np.tanh(X @ W)),
    (lambda x, w: (x.T * 2).T + w.sum(), lambda X, W: X * 2 + W.sum()),
    (lambda x, w: jnp.take(w, jnp.argmax(x, 1), 0), lambda X, W: W[np.argmax(X, 1)]),
    (lambda x, w: jnp.concatenate([x, x @ w], 1), lambda X, W: np.concatenate([X, X @ W], 1)),
], ids=["matmul", "transpose", "embedding", "concat"])
def test_row_wise_bodies_pass_the_jaxpr_reading(mesh4, rng, body, expected):
    X, W = randn(rng, 7, 3), randn(rng, 3, 3)
    f = jlm.local_map(body, [Shard(0)], ([Shard(0)], [Replicate()]), device_mesh=mesh4)
    y = f(jlm.distribute_tensor(X, mesh4, [Shard(0)]), jlm.distribute_tensor(W, mesh4, [Replicate()]))
    assert_close(jlm.full_tensor(y), expected(X, W), rtol=1e-4)


@pytest.mark.parametrize("use, label", [
    (lambda u: u + u, "the operator +"), (lambda u: 2.0 * u, "the operator *"),
    (lambda u: u @ u, "the operator @"), (lambda u: u < 1, "the operator <"),
    (lambda u: u == u, "the operator =="), (lambda u: -u, "the operator unary -"), (lambda u: u[0], "indexing"),
    (jnp.sin, "a jax.numpy function"), (lambda u: jnp.add(1.0, u), "a jax.numpy function"),
    (jnp.sum, "a jax.numpy function"), (jax.nn.relu, "a jax.numpy function"),
    (lambda u: jax.lax.add(u, u), "a jax.numpy function"), (np.asarray, "numpy"),
    (jax.jit(lambda u: u * 2), "the operator *"),
])
def test_uneven_array_used_as_an_array_says_what_it_is_and_the_ways_out(mesh4, rng, use, label):
    # 18 rows on 4 devices: chunks of 5, 5, 5, 3 (the sequence of 18 on tp=4)
    u = jlm.distribute_tensor(randn(rng, 18, 4), mesh4, [Shard(0)])
    with pytest.raises(jlm.UnevenArrayError) as caught:
        use(u)
    message = str(caught.value)
    assert isinstance(caught.value, jlm.LocalMapError)
    assert message.startswith(f"{label}: expected an array, found UnevenArray(shape=(18, 4)")
    for way_out in ("jlm.full_tensor(x)", "divisible by the mesh axes", "inside a local_map region"):
        assert way_out in message


def test_uneven_array_still_passes_through_jit_as_a_pytree(mesh4, rng):
    X = randn(rng, 18, 4)
    u = jlm.distribute_tensor(X, mesh4, [Shard(0)])
    assert_close(jlm.full_tensor(jax.jit(lambda u: u)(u)), X)
