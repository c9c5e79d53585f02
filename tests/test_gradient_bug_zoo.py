"""The gradient-bug zoo (docs/gradient_bugs.md): torchtitan's fixed gradient bugs
around local_map / to_local / from_local, each reproduced in JAX.

For each case the program written right equals the unsharded gradients, and the
buggy declaration raises at trace time, naming the argument and the fix (or the
bug cannot be written, and the test shows what happens instead). The error texts
pasted in the docs page are checked against the library's."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard
from tests.helpers import assert_close

P, R = [Partial()], [Replicate()]
DOC = pathlib.Path(__file__).parents[1] / "docs" / "gradient_bugs.md"


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def mesh_of(tp):
    return jax.make_mesh((tp,), ("tp",))


def randn(*shape, seed=0):
    return (np.random.default_rng(seed + len(shape)).standard_normal(shape) / 2).astype(np.float32)


def sharded_grads(mesh, loss, *args):
    argnums = tuple(range(len(args)))
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(loss, argnums=argnums))(*args)
    return [np.asarray(jlm.full_tensor(g)) for g in grads]


def unsharded_grads(loss, *args):
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def assert_all_close(got, want):
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def summed(mesh, region):
    """The loss of a region with a Partial output: reduce it, then sum of squares."""
    return lambda *a: jnp.sum(jlm.redistribute(region(*a), mesh, R) ** 2)


# -- #1805 / #1878: routed experts under TP, tokens replicated ----------------
def tp_experts(x, w1, w2, assign):
    h = jax.nn.gelu(jnp.einsum("td,tdh->th", x, w1[assign]))
    return jnp.einsum("th,thd->td", h, w2[assign])


def case_moe_tp(x_grad):
    mesh = mesh_of(2)
    x, w1, w2 = randn(6, 4), randn(2, 4, 8), randn(2, 8, 4)
    assign = np.array([0, 1, 0, 1, 1, 0])
    region = jlm.local_map(lambda x, w1, w2: tp_experts(x, w1, w2, assign), P,
                           (R, [Shard(2)], [Shard(1)]), in_grad_placements=(x_grad, None, None),
                           device_mesh=mesh)
    got = sharded_grads(mesh, summed(mesh, region), x, w1, w2)
    return got, unsharded_grads(lambda *a: jnp.sum(tp_experts(*a, assign) ** 2), x, w1, w2)


# -- #2416: the router's scores sliced per TP rank, applied after the experts --
def routed_after_experts(x, scores, we):
    top = jnp.argmax(scores, -1)
    return jnp.einsum("td,tde->te", x, we[top]) * jnp.max(scores, -1, keepdims=True)


def case_router(gate_grad):
    mesh, tokens = mesh_of(2), 8
    x, wg, we = randn(tokens, 4), randn(4, 3), randn(3, 4, 4)

    def moe(x, wg, we):                 # each tp rank takes its slice of the tokens
        mine = lambda a: jax.lax.dynamic_slice_in_dim(  # noqa: E731
            a, jax.lax.axis_index("tp") * (tokens // 2), tokens // 2)
        return routed_after_experts(mine(x), mine(jax.nn.softmax(x @ wg, -1)), we)
    region = jlm.local_map(moe, [Shard(0)], (R, R, R), in_grad_placements=(None, gate_grad, None),
                           device_mesh=mesh)
    got = sharded_grads(mesh, lambda *a: jnp.sum(region(*a) ** 2), x, wg, we)
    reference = lambda x, wg, we: jnp.sum(  # noqa: E731
        routed_after_experts(x, jax.nn.softmax(x @ wg, -1), we) ** 2)
    return got, unsharded_grads(reference, x, wg, we)


def mlp(x, a, b):
    return jax.nn.gelu(x @ a) @ b


def shared_and_routed(cast_once):
    """Shared and routed experts in one region; the tokens' gradient is all-reduced
    once per use of x, or once when x is made varying once."""
    def body(x, a, b, c, d):
        if cast_once:
            x = jax.lax.pcast(x, "tp", to="varying")
        return mlp(x, a, b) + mlp(x, c, d)
    mesh = mesh_of(2)
    args = (randn(8, 4),) + tuple(randn(*s, seed=i) for i, s in enumerate([(4, 8), (8, 4)] * 2))
    col_row = ([Shard(1)], [Shard(0)])
    region = jlm.local_map(body, P, (R,) + col_row * 2, device_mesh=mesh)
    loss = summed(mesh, region)
    got = sharded_grads(mesh, loss, *args)
    with jax.set_mesh(mesh):
        comms = jlm.inspect.count_collectives(jax.grad(loss, argnums=tuple(range(5))), *args)
    reference = lambda x, a, b, c, d: jnp.sum((mlp(x, a, b) + mlp(x, c, d)) ** 2)  # noqa: E731
    return got, unsharded_grads(reference, *args), comms.executed_bytes["all-reduce"]


# -- #3412: a chunked, vocab-parallel loss accumulating its own gradient -------
def vocab_parallel_ce(h, w, labels):
    """Cross-entropy with the vocabulary split over tp: no rank holds all logits."""
    logits = h @ w
    v = w.shape[1]
    top = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), "tp")
    lse = jnp.log(jax.lax.psum(jnp.exp(logits - top[:, None]).sum(-1), "tp")) + top
    local = labels - jax.lax.axis_index("tp") * v
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, v - 1)[:, None], 1)[:, 0]
    mine = (local >= 0) & (local < v)
    return jnp.sum(lse - jax.lax.psum(jnp.where(mine, picked, 0.0), "tp"))


def full_ce(h, w, labels):
    logits = h @ w
    return jnp.sum(jax.nn.logsumexp(logits, -1)
                   - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0])


def case_chunked_loss(grad_placement, keep_partial=True, chunks=4):
    mesh = mesh_of(2)
    h, w = randn(16, 4), randn(4, 6)
    labels = np.random.default_rng(3).integers(0, 6, 16).astype(np.int32)

    def chunked(h, w, labels):          # loss and d loss / d h, one chunk at a time
        def step(total, chunk):
            hc, lc = chunk
            if keep_partial:            # this rank's summand: reduce once, after the loop
                hc = jax.lax.pcast(hc, "tp", to="varying")
            loss, grad = jax.value_and_grad(vocab_parallel_ce)(hc, w, lc)
            return total + loss, grad
        split = lambda a: a.reshape((chunks, -1) + a.shape[1:])  # noqa: E731
        total, grads = jax.lax.scan(step, jnp.zeros(()), (split(h), split(labels)))
        return total, grads.reshape(h.shape)
    region = jlm.local_map(chunked, (R, grad_placement), (R, [Shard(1)], R), device_mesh=mesh)

    def loss_and_grad(h, w, labels):
        loss, grad = region(h, w, labels)
        return loss, jlm.redistribute(grad, mesh, R)
    with jax.set_mesh(mesh):
        loss, grad = jax.jit(loss_and_grad)(h, w, labels)
        comms = jlm.inspect.count_collectives(loss_and_grad, h, w, labels)
    want = jax.jit(jax.value_and_grad(full_ce))(h, w, labels)
    return (np.asarray(loss), np.asarray(grad)), want, comms.executed["all-reduce"]


# -- #4054: MoE without EP, the computed in_grad_placements dropped -----------
def grouped_experts(xs, scores, w1, w2, counts):
    h = jax.nn.gelu(jax.lax.ragged_dot(xs, w1, counts))
    return jax.lax.ragged_dot(h, w2, counts) * scores[:, None]


def moe_without_ep(experts, tokens=8, num_experts=3):
    """Router outside the region, experts (TP-sharded, no EP) inside: tokens sorted
    by expert, their scores, and the integer tokens-per-expert counts."""
    def loss(x, wg, w1, w2):
        probs = jax.nn.softmax(x @ wg, -1)
        chosen = jnp.argmax(probs, -1)
        order = jnp.argsort(chosen)
        counts = jnp.bincount(chosen, length=num_experts).astype(jnp.int32)
        y = experts(x[order], probs[jnp.arange(tokens), chosen][order], w1, w2, counts)
        return jnp.sum(jnp.zeros_like(y).at[order].set(y) ** 2)
    return loss


def case_moe_without_ep(in_grad):
    mesh = mesh_of(2)
    args = randn(8, 4), randn(4, 3), randn(3, 4, 8), randn(3, 8, 4)
    region = jlm.local_map(grouped_experts, P, (R, R, [Shard(2)], [Shard(1)], R),
                           in_grad_placements=in_grad, device_mesh=mesh)
    got = sharded_grads(mesh, moe_without_ep(lambda *a: jlm.redistribute(region(*a), mesh, R)),
                        *args)
    return got, unsharded_grads(moe_without_ep(grouped_experts), *args)


# -- #2106 and #4332: the replicated bias of a row-wise layer ------------------
TP_BIAS = 4
BIAS_BODIES = {
    "b / tp": lambda x, w, b: x @ w + b / TP_BIAS,
    # torchtitan's #4332 fix, ported literally: b / tp forward, derivative 1.
    "straight-through": lambda x, w, b: x @ w + b + jax.lax.stop_gradient(b / TP_BIAS - b),
}


def case_rowwise_bias(body, bias_grad=None):
    mesh = mesh_of(TP_BIAS)
    x, w, b = randn(6, 8), randn(8, 3), randn(3)
    region = jlm.local_map(BIAS_BODIES[body], P, ([Shard(1)], [Shard(0)], R),
                           in_grad_placements=(None, None, bias_grad), device_mesh=mesh)
    loss = summed(mesh, region)
    got = sharded_grads(mesh, loss, x, w, b)
    with jax.set_mesh(mesh):
        forward = float(jax.jit(loss)(x, w, b))
        comms = jlm.inspect.count_collectives(jax.grad(loss, argnums=(0, 1, 2)), x, w, b)
    reference = lambda x, w, b: jnp.sum((x @ w + b) ** 2)  # noqa: E731
    want = unsharded_grads(reference, x, w, b)
    return got, want, (forward, float(reference(x, w, b))), comms.counts["all-reduce"]


# -- #404: a fused RMSNorm kernel under sequence parallelism ------------------
EPS = 1e-6


def rms_norm(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + EPS) * w


@jax.custom_vjp
def fused_rms_norm(x, w):           # stands for a kernel with a hand-written backward
    return rms_norm(x, w)


def _fused_fwd(x, w):
    rstd = jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + EPS)
    return x * rstd * w, (x, w, rstd)


def _fused_bwd(saved, dy):
    x, w, rstd = saved
    x_hat, w_dy = x * rstd, w * dy
    dx = (w_dy - x_hat * jnp.mean(x_hat * w_dy, -1, keepdims=True)) * rstd
    dw = jnp.sum(dy * x_hat, axis=tuple(range(x.ndim - 1)))    # this rank's rows only
    return dx, dw


fused_rms_norm.defvjp(_fused_fwd, _fused_bwd)


def case_fused_rmsnorm(weight_grad, body=fused_rms_norm):
    mesh = mesh_of(2)
    x, w = randn(2, 8, 4), 1 + randn(4)
    region = jlm.local_map(body, [Shard(1)], ([Shard(1)], R),
                           in_grad_placements=(None, weight_grad), device_mesh=mesh)
    got = sharded_grads(mesh, lambda x, w: jnp.sum(jnp.sin(region(x, w))), x, w)
    return got, unsharded_grads(lambda x, w: jnp.sum(jnp.sin(rms_norm(x, w))), x, w)


# -- the tests -----------------------------------------------------------------
RIGHT = {
    "moe_tp, no declaration": lambda: case_moe_tp(None),
    "moe_tp, Partial": lambda: case_moe_tp(P),
    "router, no declaration": lambda: case_router(None),
    "router, Partial": lambda: case_router(P),
    "moe_without_ep, Partial": lambda: case_moe_without_ep((P, P, None, None, None)),
    "fused_rmsnorm, Partial": lambda: case_fused_rmsnorm(P),
    "fused_rmsnorm, cast in the body": lambda: case_fused_rmsnorm(
        None, lambda x, w: fused_rms_norm(x, jax.lax.pcast(w, "tp", to="varying"))),
}

BUGGY = {   # the declaration each torchtitan bug made, in jlocalmap's terms, and the
    # argument the error must name
    "moe_tp": (lambda: case_moe_tp(R), "in_grad_placements[0]"),
    "router": (lambda: case_router(R), "in_grad_placements[1]"),
    "chunked_loss": (lambda: case_chunked_loss(R), "out_placements[1]"),
    # PyTorch's default, the input's own placements, written out; the integer
    # counts too (an integer has no cotangent: any declaration of it is accepted).
    "moe_without_ep": (lambda: case_moe_without_ep((R, R, None, None, R)),
                       "in_grad_placements[0]"),
    "rowwise_bias": (lambda: case_rowwise_bias("b / tp", R), "in_grad_placements[2]"),
}


@pytest.mark.parametrize("case", RIGHT)
def test_written_right_equals_the_unsharded_gradients(case):
    got, want = RIGHT[case]()
    assert_all_close(got, want)


@pytest.mark.parametrize("case", BUGGY)
def test_the_buggy_declaration_raises_at_trace_time(case):
    program, argument = BUGGY[case]
    with pytest.raises(jlm.PlacementValueError, match=re.escape(argument) + r".*(Declare|declare) "
                       r"Partial\(\)"):
        program()


def test_moe_without_ep_the_dropped_declaration_is_harmless():
    got, want = case_moe_without_ep(None)      # None: JAX reduces, nothing to drop
    assert_all_close(got, want)
    # torchtitan's router gate gradient norms were off by about sqrt(tp)
    assert np.linalg.norm(got[1]) / np.linalg.norm(want[1]) == pytest.approx(1.0, rel=1e-5)


def test_shared_and_routed_experts_reduce_the_tokens_gradient_once_when_cast_once():
    per_use_got, want, per_use_bytes = shared_and_routed(cast_once=False)
    once_got, _, once_bytes = shared_and_routed(cast_once=True)
    assert_all_close(per_use_got, want)
    assert_all_close(once_got, want)
    tokens_grad = 8 * 4 * 4                     # (8, 4) float32
    assert per_use_bytes - once_bytes == tokens_grad


def test_chunked_loss_right_reduces_once_and_the_naive_form_once_per_chunk():
    (loss, grad), (want_loss, want_grad), once = case_chunked_loss(P, keep_partial=True)
    assert_close(loss, want_loss)
    assert_close(grad, want_grad)
    (loss, grad), _, per_chunk = case_chunked_loss(R, keep_partial=False)
    assert_close(loss, want_loss)
    assert_close(grad, want_grad)
    assert per_chunk - once == 4 - 1            # one gradient all-reduce per chunk, not one


def test_partial_plus_replicated_bias_gradient_is_not_tp_times_too_large():
    got, want, (forward, want_forward), all_reduces = case_rowwise_bias("b / tp")
    assert forward == pytest.approx(want_forward, rel=1e-5)
    assert_all_close(got, want)
    assert all_reduces == 2     # the forward's reduction and the bias gradient's, nothing more


def test_the_ported_straight_through_fix_makes_the_bias_gradient_tp_times_too_large():
    got, want, (forward, want_forward), _ = case_rowwise_bias("straight-through")
    assert forward == pytest.approx(want_forward, rel=1e-5)
    assert_close(got[2], TP_BIAS * np.asarray(want[2]))   # JAX already reduces: tp x


@pytest.mark.parametrize("declared", [None, R], ids=["undeclared", "Replicate"])
def test_a_custom_backward_returning_this_ranks_rows_is_never_silently_wrong(declared):
    """A custom rule's backward defines the cotangent, so jlocalmap trusts the
    declaration there. JAX's typing of the rule takes over: jax 0.10 refuses a
    per-rank dw for a weight that is the same on every rank (Replicate() or no
    declaration); where a JAX version accepts it, it reduces it, so the
    gradients must equal the unsharded ones."""
    try:
        got, want = case_fused_rmsnorm(declared)
    except ValueError as e:
        # jax 0.11 names the rule: "Custom VJP bwd rule attached to fused_rms_norm at ..."
        assert re.search(r"Custom VJP bwd rule .*must produce an output with the same type",
                         str(e)), str(e)
        return
    assert_all_close(got, want)


def case_fused_rmsnorm_2d(weight_grad):
    """The fused norm on a (dp, tp) mesh: batch over dp, sequence over tp."""
    mesh = jax.make_mesh((2, 2), ("dp", "tp"))
    x, w = randn(4, 8, 4), 1 + randn(4)
    region = jlm.local_map(fused_rms_norm, [Shard(0), Shard(1)],
                           ([Shard(0), Shard(1)], [Replicate(), Replicate()]),
                           in_grad_placements=(None, weight_grad), device_mesh=mesh)
    got = sharded_grads(mesh, lambda x, w: jnp.sum(jnp.sin(region(x, w))), x, w)
    return got, unsharded_grads(lambda x, w: jnp.sum(jnp.sin(rms_norm(x, w))), x, w)


@pytest.mark.parametrize("case, declared, shown, axes, fix", [
    (case_fused_rmsnorm, R, "declared [Replicate()]", "axis 'tp'", "[Partial(sum)]"),
    (case_fused_rmsnorm, None, "undeclared, so its own placements [Replicate()]", "axis 'tp'",
     "[Partial(sum)]"),
    (case_fused_rmsnorm_2d, [Partial(), Replicate()], "declared [Partial(sum), Replicate()]",
     "axis 'tp'", "[Partial(sum), Partial(sum)]"),
    (case_fused_rmsnorm_2d, None, "undeclared, so its own placements [Replicate(), Replicate()]",
     "axes 'dp', 'tp'", "[Partial(sum), Partial(sum)]"),
], ids=["1-axis Replicate", "1-axis undeclared", "2-axis Partial on dp only", "2-axis undeclared"])
def test_a_custom_backward_against_its_declaration_names_the_region_and_the_fix(
        case, declared, shown, axes, fix):
    """torchtitan #404: the per-rank dw of a fused kernel for a weight whose gradient
    is Replicate() is refused at trace time with jlocalmap's error, JAX's as its cause."""
    with pytest.raises(jlm.PlacementValueError) as info:
        case(declared)
    text = str(info.value)
    assert text.startswith("in_grad_placements[1]: the custom_vjp rule in local_map[fused_rms_norm]")
    assert f"differs across mesh {axes}" in text and f"its gradient is {shown}" in text
    assert f"Declare in_grad_placements[1]={fix}" in text and "jax.lax.psum" in text
    assert "Custom VJP bwd rule" in str(info.value.__cause__)


def test_the_fused_norm_declared_partial_on_both_axes_matches_the_unsharded_norm():
    got, want = case_fused_rmsnorm_2d([Partial(), Partial()])
    assert_all_close(got, want)


def _doc_errors() -> dict[str, str]:
    blocks = re.findall(r"<!-- zoo error: (\w+) -->\s*```text\n(.*?)```", DOC.read_text(), re.S)
    return {name: " ".join(text.split()) for name, text in blocks}


def test_the_docs_paste_the_librarys_error_texts():
    pasted = _doc_errors()
    assert set(pasted) == set(BUGGY)
    for case, text in pasted.items():
        with pytest.raises(jlm.PlacementValueError) as error:
            BUGGY[case][0]()
        assert " ".join(str(error.value).split()) == text, case
