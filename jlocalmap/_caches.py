"""The one cache policy of jlocalmap: every cache is an :class:`LRU`, bounded,
truly least-recently-used (a hit refreshes its entry), keyed by values (an
unhashable value by :class:`Identity`, which holds it), safe under threads,
and emptied by :func:`clear_caches`.

Example:
    >>> from jlocalmap._caches import LRU, clear_caches
    >>> cache = LRU(2)
    >>> for key in "abac":          # "a" is used again: "b" is the least recently used
    ...     _ = cache.get(key) or cache.put(key, key.upper())
    >>> sorted(cache.keys()), clear_caches(), len(cache)
    (['a', 'c'], None, 0)
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, Optional, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_ALL: "weakref.WeakSet[LRU]" = weakref.WeakSet()   # every live cache, for clear_caches
_ALL_LOCK = threading.Lock()


class LRU(Generic[K, V]):
    """A bounded, thread-safe, least-recently-used map, registered with
    :func:`clear_caches` for as long as it lives."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.RLock()
        with _ALL_LOCK:
            _ALL.add(self)

    def get(self, key: K, default: Optional[V] = None) -> Optional[V]:
        """The value of ``key`` (refreshed as most recently used), else ``default``."""
        with self._lock:
            try:
                self._data.move_to_end(key)
            except KeyError:
                return default
            return self._data[key]

    def put(self, key: K, value: V) -> V:
        """Store ``value`` under ``key``, evicting the least recently used beyond maxsize."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def pop(self, key: K) -> None:
        with self._lock:
            self._data.pop(key, None)

    def keys(self) -> list:
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def cached(maxsize: int) -> Callable[[Callable[..., V]], Callable[..., V]]:
    """``functools.lru_cache`` under this module's policy (bounded, cleared by
    :func:`clear_caches`) for functions of hashable arguments."""
    def decorate(fn: Callable[..., V]) -> Callable[..., V]:
        cache: LRU = LRU(maxsize)
        missing = object()

        @functools.wraps(fn)
        def wrapper(*args: Hashable) -> V:
            found = cache.get(args, missing)
            if found is missing:
                found = cache.put(args, fn(*args))
            return found  # type: ignore[return-value]
        wrapper.cache = cache  # type: ignore[attr-defined]
        return wrapper
    return decorate


class Identity:
    """A cache-key part for an unhashable value: equal only to itself holding
    the same object, which it keeps alive (so its id is never reused while the
    key exists)."""
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def clear_caches() -> None:
    """Empty every cache jlocalmap keeps (compiled programs, plans, layouts,
    output facts, strategy choices), as ``equinox.clear_caches`` does; the next
    call plans, traces and compiles again.

    Example:
        >>> import jlocalmap as jlm
        >>> jlm.clear_caches()
    """
    with _ALL_LOCK:
        caches = list(_ALL)
    for cache in caches:
        cache.clear()


def cache_sizes() -> int:
    """The number of entries held by all caches (what :func:`clear_caches` empties)."""
    with _ALL_LOCK:
        return sum(len(c) for c in list(_ALL))
