"""Typed PRNG keys (``jax.random.key``, what Flax NNX's ``Rngs`` hands out) through
jlocalmap wherever arrays go: Replicate (one key) and Shard(0) (a key per device
or per row) inputs, key outputs, distribute_tensor, redistribute, full_tensor,
placements_of, describe, count_collectives, jlm.inspect.regions, eager calls and
jax.jit, next to differentiated inputs (a key needs no gradient declaration).

Every draw is compared bit for bit with the unsharded computation using the
same keys, and devices holding different keys draw differently. A Partial key
has no meaning (random bits have no sum) and is refused with a jlocalmap error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

TE = jlm.PlacementTypeError


def bits(keys) -> np.ndarray:
    """The key data of a (distributed) key array, as numpy words."""
    return np.asarray(jax.random.key_data(jlm.full_tensor(keys)))


def row_noise(keys, x):
    """x plus a uniform draw per row, each row from its own key (a batch of keys).
    Uniform floats are made from the random bits exactly, so sharded and unsharded
    draws agree bit for bit (a normal draw's erf_inv is rounded as XLA's CPU
    code for the array's length happens to round it: jax 0.10.2 differs by an
    ulp between 2 and 8 rows; see test_normal_draws_agree_to_an_ulp)."""
    return x + jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype))(keys)


@pytest.fixture
def data(rng):
    keys = jax.random.split(jax.random.key(rng.integers(2 ** 31)), 8)
    return keys, rng.standard_normal((8, 3)).astype(np.float32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("given", ["host", "distributed"])
def test_sharded_keys_draw_as_unsharded(mesh4, data, jit, given):
    """Shard(0) keys, one per row of a Shard(0) x: the same bits as unsharded."""
    keys, x = data
    f = jlm.local_map(row_noise, [Shard(0)], ([Shard(0)], [Shard(0)]), device_mesh=mesh4)
    arg = keys if given == "host" else jlm.distribute_tensor(keys, mesh4, [Shard(0)])
    out = (jax.jit(f) if jit else f)(arg, x)
    assert jlm.placements_of(out) == (Shard(0),)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(row_noise(keys, x)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_replicated_key_folded_per_device_draws_differently(mesh4, data, jit):
    """One Replicate() key folded with the device index (per-device dropout
    masks): each device's chunk equals the unsharded draw from its folded key,
    and no two devices draw the same mask."""
    key, x = data[0][0], data[1]

    def dropout(k, x):
        k = jax.random.fold_in(k, jax.lax.axis_index("tp"))
        return jnp.where(jax.random.bernoulli(k, 0.5, x.shape), x * 2, 0)

    f = jlm.local_map(dropout, [Shard(0)], ([Replicate()], [Shard(0)]), device_mesh=mesh4)
    got = np.asarray((jax.jit(f) if jit else f)(key, x))
    masks = [np.asarray(jax.random.bernoulli(jax.random.fold_in(key, d), 0.5, (2, 3)))
             for d in range(4)]
    want = np.where(np.concatenate(masks), x * 2, 0)
    np.testing.assert_array_equal(got, want)
    assert len({m.tobytes() for m in masks}) == 4


def test_devices_holding_different_keys_draw_differently(mesh4, data):
    """Four keys on four devices, each drawing a (2, 3) block from its own key."""
    keys = data[0][:4]
    f = jlm.local_map(lambda k: jax.random.uniform(k[0], (2, 3)), [Shard(0)], ([Shard(0)],),
                      device_mesh=mesh4)
    got = np.asarray(f(keys)).reshape(4, 2, 3)
    for d in range(4):
        np.testing.assert_array_equal(got[d], np.asarray(jax.random.uniform(keys[d], (2, 3))))
    assert len({block.tobytes() for block in got}) == 4


def test_normal_draws_agree_to_an_ulp(mesh4, data):
    """Normal draws per row: the same random bits (checked exactly), and the
    same normals up to XLA's rounding of erf_inv (one ulp)."""
    keys, x = data

    def draws(k):
        return jax.vmap(lambda kk: (jax.random.bits(kk, (3,)), jax.random.normal(kk, (3,))))(k)

    f = jlm.local_map(draws, ([Shard(0)], [Shard(0)]), ([Shard(0)],), device_mesh=mesh4)
    (got_bits, got_normal), (want_bits, want_normal) = f(keys), draws(keys)
    np.testing.assert_array_equal(np.asarray(got_bits), np.asarray(want_bits))
    np.testing.assert_array_max_ulp(np.asarray(got_normal), np.asarray(want_normal), maxulp=2)


def test_uneven_keys(mesh4, data):
    """Six keys over four devices (2 + 2 + 1 + 1 rows): padding keys never leak."""
    keys, x = data[0][:6], data[1][:6]
    f = jlm.local_map(row_noise, [Shard(0)], ([Shard(0)], [Shard(0)]), device_mesh=mesh4)
    out = f(keys, x)
    assert isinstance(out, jlm.UnevenArray)
    np.testing.assert_array_equal(np.asarray(jlm.full_tensor(out)),
                                  np.asarray(row_noise(keys, x)))


@pytest.mark.parametrize("placements", [[Shard(0)], [Replicate()]], ids=["Shard", "Replicate"])
def test_key_outputs(mesh4, data, placements):
    """A body that splits its keys returns keys, laid out as declared."""
    keys = data[0]
    if placements == [Shard(0)]:
        f = jlm.local_map(lambda k: jax.vmap(lambda kk: jax.random.split(kk, 2)[1])(k),
                          placements, ([Shard(0)],), device_mesh=mesh4)
        want = jax.vmap(lambda kk: jax.random.split(kk, 2)[1])(keys)
    else:
        f = jlm.local_map(lambda k: jax.random.split(k, 3), placements, ([Replicate()],),
                          device_mesh=mesh4)
        keys, want = keys[0], jax.random.split(keys[0], 3)
    out = f(keys)
    assert jax.dtypes.issubdtype(out.dtype, jax.dtypes.prng_key)
    assert jlm.placements_of(out) == tuple(placements)
    np.testing.assert_array_equal(bits(out), np.asarray(jax.random.key_data(want)))


def test_distribute_redistribute_full_tensor_describe(mesh2x4, data):
    keys = data[0]
    kd = jlm.distribute_tensor(keys, mesh2x4, [Replicate(), Shard(0)])
    assert kd.dtype == keys.dtype and kd.shape == (8,)
    assert jlm.placements_of(kd) == (Replicate(), Shard(0))
    assert jax.jit(lambda k: k)(kd).dtype == keys.dtype
    seen = []
    jax.jit(lambda k: seen.append(jlm.placements_of(k)) or k)(kd)
    assert seen == [(Replicate(), Shard(0))]
    assert str(keys.dtype) in jlm.inspect.describe(kd).splitlines()[0]
    for placements in ([Shard(0), Replicate()], [Replicate(), Replicate()], [Shard(0), Shard(0)]):
        moved = jlm.redistribute(kd, mesh2x4, placements)
        assert jlm.placements_of(moved) == tuple(placements)
        np.testing.assert_array_equal(bits(moved), np.asarray(jax.random.key_data(keys)))
    # the gather of 8 keys (two uint32 words each) is one all-gather
    counts = jlm.inspect.count_collectives(lambda k: jlm.redistribute(k, mesh2x4, [Replicate()] * 2), kd)
    assert counts.counts["all-gather"] == 1 and counts.bytes["all-gather"] == 8 * 2 * 4


def test_regions_and_count_collectives_of_a_key_input(mesh4, data):
    keys, x = data
    f = jlm.local_map(row_noise, [Shard(0)], ([Shard(0)], [Shard(0)]), device_mesh=mesh4)
    [r] = jlm.inspect.regions(f, keys, x)
    assert [op.dtype for op in r.inputs] == [keys.dtype, np.dtype(np.float32)]
    assert [op.local_shape for op in r.inputs] == [(2,), (2, 3)]
    assert str(keys.dtype) in str(r.inputs[0])
    assert jlm.inspect.count_collectives(f, keys, x).counts["all-gather"] == 0
    gather = jlm.local_map(row_noise, [Replicate()], ([Replicate()], [Replicate()]),
                           device_mesh=mesh4, redistribute_inputs=True)
    kd, xd = (jlm.distribute_tensor(v, mesh4, [Shard(0)]) for v in (keys, x))
    assert jlm.inspect.count_collectives(gather, kd, xd).counts["all-gather"] == 2


@pytest.mark.parametrize("declared", [False, True], ids=["plain", "in_grad_placements"])
def test_gradient_next_to_a_key(mesh4, data, declared):
    """A differentiated Replicate weight next to Shard(0) keys: the gradient
    equals the unsharded one; the key needs no declaration (None)."""
    keys, x = data
    w = np.linspace(-1, 1, 3).astype(np.float32)
    grads = (None, None, [Partial()]) if declared else None
    f = jlm.local_map(lambda k, x, w: row_noise(k, x) * w, [Shard(0)],
                      ([Shard(0)], [Shard(0)], [Replicate()]), grads, mesh4)
    with jax.set_mesh(mesh4):
        gx, gw = jax.jit(jax.grad(lambda x, w: (f(keys, x, w) ** 2).sum(), (0, 1)))(x, w)
    rx, rw = jax.grad(lambda x, w: ((row_noise(keys, x) * w) ** 2).sum(), (0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5)


def test_partial_keys_are_refused(mesh4, data):
    keys = data[0]
    message = r"Partial\('{}'\) on mesh axis 'tp' for a value of PRNG keys"
    with pytest.raises(TE, match=r"placements: " + message.format("sum")):
        jlm.distribute_tensor(keys, mesh4, [Partial()])
    with pytest.raises(TE, match=r"in_placements\[0\]: " + message.format("sum")):
        jlm.local_map(lambda k: k, [Replicate()], ([Partial()],), device_mesh=mesh4)(keys)
    for op in ("sum", "max"):
        f = jlm.local_map(lambda k: k, [Partial(op)], ([Shard(0)],), device_mesh=mesh4)
        with pytest.raises(TE, match=r"out_placements\[0\]: " + message.format(op)):
            f(keys)
