"""The one cache policy (jlocalmap._caches): bounded, truly LRU, keyed by values,
safe under threads, emptied by jlm.clear_caches()."""

import gc
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

import jlocalmap as jlm
from jlocalmap._caches import LRU, Identity, cache_sizes
from jlocalmap.call.call_plan import hashable


def test_lru_refreshes_hits_and_evicts_the_least_recently_used():
    cache = LRU(3)
    for k in "abc":
        cache.put(k, k.upper())
    assert cache.get("a") == "A"       # a hit refreshes "a": "b" is now the oldest
    cache.put("d", "D")
    assert cache.keys() == ["c", "a", "d"] and cache.get("b") is None


def test_lru_is_safe_under_threads():
    cache = LRU(50)

    def hammer(seed):
        rng = np.random.default_rng(seed)
        for k in rng.integers(0, 200, 2000):
            if cache.get(int(k)) is None:
                cache.put(int(k), int(k))
    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 50 and all(cache.get(k) == k for k in cache.keys())


def test_unhashable_statics_are_keyed_by_the_object_held_not_its_id():
    a, b = [1], [1]
    assert hashable(a) == hashable(a) and hashable(a) != hashable(b)
    key = hashable(a)
    del a
    gc.collect()
    assert key[1].value == [1]         # the key keeps its object: its id is never reused
    assert isinstance(key[1], Identity)


def _signatures(f, spec, start, stop):
    for i in range(start, stop):
        jax.eval_shape(lambda x, i=i: f(x, float(i)), spec)


def test_ten_thousand_call_signatures_keep_the_caches_bounded(mesh4):
    jlm.clear_caches()
    f = jlm.local_map(lambda x, k: x * k, [jlm.Shard(0)], ([jlm.Shard(0)], None),
                      device_mesh=mesh4)
    spec = jax.ShapeDtypeStruct((8,), jnp.float32)
    _signatures(f, spec, 0, 1000)
    held = cache_sizes()
    gc.collect()
    before = len(gc.get_objects())
    _signatures(f, spec, 1000, 10000)
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert cache_sizes() == held <= 400, (held, cache_sizes())
    assert grown < 5000, f"{grown} more Python objects after 9,000 more signatures"


def test_clear_caches_leaves_no_entry(mesh4, rng):
    f = jlm.local_map(lambda x: x * 2, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh4)
    x = jlm.distribute_tensor(rng.standard_normal(7).astype(np.float32), mesh4, [jlm.Shard(0)])
    y = f(x)
    jax.jit(f)(x)
    assert cache_sizes() > 0
    jlm.clear_caches()
    assert cache_sizes() == 0
    np.testing.assert_array_equal(np.asarray(jlm.full_tensor(f(x))),
                                  np.asarray(jlm.full_tensor(y)))   # and calls work after


def test_ten_thousand_eager_signatures_keep_the_caches_bounded(mesh4, rng):
    """A Python number laid out by its entry is part of an eager call's signature
    (not of its program): before #28 each value added a cache entry no insertion
    evicted (10,000 calls: 10,000 entries)."""
    f = jlm.local_map(lambda x, k: x * k, [jlm.Shard(0)], ([jlm.Shard(0)], [jlm.Replicate()]),
                      device_mesh=mesh4)
    X = rng.standard_normal(8).astype(np.float32)
    x = jlm.distribute_tensor(X, mesh4, [jlm.Shard(0)])
    for i in range(1000):
        f(x, float(i))
    gc.collect()   # earlier tests' wrappers die here, not between the counts
    held, before = cache_sizes(), len(gc.get_objects())
    for i in range(1000, 10000):
        y = f(x, float(i))
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert cache_sizes() <= held <= 400, (held, cache_sizes())
    assert grown < 5000, f"{grown} more Python objects after 9,000 more signatures"
    np.testing.assert_allclose(np.asarray(jlm.full_tensor(y)), X * 9999.0, rtol=1e-6)


def _filled_containers(*owners) -> dict:
    """name -> entries of each non-empty dict, set, list or LRU among jlocalmap's
    module globals and the attributes of ``owners`` (and of their regions)."""
    found = {}
    places = [(name, vars(m)) for name, m in list(sys.modules.items())
              if name.startswith("jlocalmap") and m is not None]
    places += [(f"owner{i}", vars(o)) for i, o in enumerate(owners)]
    places += [(f"owner{i}._region", vars(o._region)) for i, o in enumerate(owners)]
    for where, attrs in places:
        for attr, value in list(attrs.items()):
            held = getattr(value, "cache", value)   # a @cached function's LRU
            if isinstance(held, (dict, set, list, LRU)) and len(held):
                found[f"{where}.{attr}"] = len(held)
    return found


def test_clear_caches_leaves_no_entry_in_any_container(mesh4, rng):
    """Not only the LRUs: every container jlocalmap fills on eager, jitted,
    differentiated, uneven, padding-checked and inspected calls is empty after."""
    before = _filled_containers()
    f = jlm.local_map(lambda x: jnp.sin(x) * 2, [jlm.Shard(0)], ([jlm.Shard(0)],),
                      device_mesh=mesh4, check_padding=True)

    def loss(v):
        return jlm.full_tensor(f(v)).sum()
    for rows in (8, 7):
        X = rng.standard_normal(rows).astype(np.float32)
        x = jlm.distribute_tensor(X, mesh4, [jlm.Shard(0)])
        np.testing.assert_allclose(np.asarray(jlm.full_tensor(f(x))), np.sin(X) * 2, rtol=1e-6)
        with jax.set_mesh(mesh4):
            jax.jit(f)(x)
            np.testing.assert_allclose(np.asarray(jlm.full_tensor(jax.grad(loss)(x))),
                                       np.cos(X) * 2, rtol=1e-6)
            jlm.inspect.regions(jax.grad(loss), x)
    assert len(_filled_containers(f)) > len(before)
    jlm.clear_caches()
    left = {k: n for k, n in _filled_containers(f).items() if n > before.get(k, 0)}
    assert left == {}, left
