"""region.row_flow: the padding rows' flow through a jaxpr, read without running it."""

import jax
import jax.numpy as jnp
import pytest

from jlocalmap.region.row_flow import CLEAN, MIXED, UNKNOWN, flow

ROWS = frozenset({(0, "rows")})


def states(fn, *shapes):
    jaxpr = jax.make_jaxpr(fn)(*(jnp.ones(s) for s in shapes)).jaxpr
    return flow(jaxpr, [ROWS] + [CLEAN] * (len(shapes) - 1))


@pytest.mark.parametrize("fn, expected", [
    (lambda x, w: jnp.tanh(x) * 2 + 1, ROWS),                     # elementwise
    (lambda x, w: x @ w, ROWS),                                    # rows stay rows
    (lambda x, w: (x @ w).T, frozenset({(1, "rows")})),            # a transpose moves the dim
    (lambda x, w: x.reshape(4, 2, 2), ROWS),                       # later dims split
    (lambda x, w: x[:, None, :] * w[0], ROWS),                     # broadcasting
    (lambda x, w: jnp.take(w, jnp.argmax(x, 1), 0), ROWS),         # an embedding lookup
    (lambda x, w: w.sum() + 0 * w, CLEAN),                         # padding never reached
    (lambda x, w: jnp.where(jnp.arange(4)[:, None] < 3, x, 0).sum(0), CLEAN),  # masked
    (lambda x, w: x.sum(0), MIXED),                                # a sum over the rows
    (lambda x, w: x.T @ x, MIXED),                                 # contracted away
    (lambda x, w: jnp.cumsum(x, 0), MIXED),                        # running along them
    (lambda x, w: x[1:], MIXED),                                   # a shift
    (lambda x, w: x.reshape(2, 8), MIXED),                         # rows merged
    (lambda x, w: jax.lax.fori_loop(0, 2, lambda i, v: v * 2, x), UNKNOWN),  # a loop
], ids=["elementwise", "matmul", "transpose", "reshape", "broadcast", "gather", "clean",
        "masked", "sum", "contraction", "cumsum", "shift", "merge", "loop"])
def test_states(fn, expected):
    assert states(fn, (4, 4), (4, 4))[0] == expected


def test_jit_and_custom_jvp_bodies_are_followed():
    @jax.custom_jvp
    def act(x):
        return jnp.tanh(x)
    act.defjvp(lambda p, t: (act(p[0]), t[0]))
    assert states(jax.jit(lambda x, w: act(x) + w), (4, 4), (4, 4)) == [ROWS]
    assert states(jax.jit(lambda x, w: act(x).mean(0)), (4, 4), (4, 4)) == [MIXED]
