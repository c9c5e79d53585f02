"""Test helpers: random data, value checks against the unsharded computation,
collective counts read from compiled HLO."""

import re

import jax
import numpy as np


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count_compiled(lowered):
    """Collective ops of each kind in a lowered program's compiled HLO."""
    text = lowered.compile().as_text()
    return {c: len(re.findall(rf"\s{c}(?:-start)?\(", text)) for c in COLLECTIVES}


def count_collectives(fn, *args, **kwargs):
    """Collective ops of each kind in the compiled HLO of ``jax.jit(fn)``."""
    return count_compiled(jax.jit(fn).lower(*args, **kwargs))
