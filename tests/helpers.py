"""Test helpers: random data, value checks against the unsharded computation,
and collective counts through the library's own accounting (jlocalmap.inspect.comm)."""

import numpy as np
import pytest

import jlocalmap as jlm


def need(module: str):
    """The optional test dependency ``module`` (of the ``test`` extra), or a skip that
    says how to install it, as tests/torch_parity does for torch."""
    return pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[test]'")


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def count_compiled(lowered):
    """Collectives of each kind in a lowered program, compiled."""
    return jlm.inspect.collectives_in_hlo(lowered.compile().as_text()).counts


def count_collectives(fn, *args, **kwargs):
    """Collectives of each kind in the compiled ``jax.jit(fn)``."""
    return jlm.inspect.count_collectives(fn, *args, **kwargs).counts
