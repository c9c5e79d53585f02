"""The one cache policy (jlocalmap._caches): bounded, truly LRU, keyed by values,
safe under threads, emptied by jlm.clear_caches()."""

import gc
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
