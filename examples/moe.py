"""Mixture of experts with expert parallelism, trained with ``jlocalmap.local_map``.

One MoE layer ``y = x + MoE(x)`` on a ``(dp, ep)`` device mesh:

* tokens ``x`` (and the target) are split over every device: ``[Shard(0), Shard(0)]``;
* the top-2 router weight is replicated: each device routes its own tokens, so
  its gradient is a partial sum over the token shards, declared
  ``in_grad_placements=[Partial(), Partial()]`` and checked by jlocalmap against
  JAX's typing of the body;
* each device keeps at most ``capacity`` tokens per expert (first choices
  before second choices, in token order; the rest are dropped, GShard's rule),
  packs them into an ``(experts, capacity, dim)`` buffer and sends each expert's
  slots to the ``ep`` rank that holds it with one ``all_to_all``;
* the expert weights are stored ``Shard(0)`` over ``ep`` (``experts / ep`` per
  rank, replicated over ``dp``) and applied as one batched matmul;
* a second ``all_to_all`` brings the results back, combined with the router scores;
* a load-balancing loss (Switch Transformer's ``E * sum_e f_e * P_e``) is reduced
  over the whole batch inside the body with ``jax.lax.psum``.

The unsharded reference runs the same routing (the same token groups, capacity
and drop rule) on one device in plain ``jax.numpy``. Every step prints the loss
and the largest differences of loss, gradients and parameters; the script exits
with status 1 if any exceeds 1e-5 (float32).

Run:  python examples/moe.py [--steps 5] [--tokens 512] [--experts 8]
(uses the GPUs if there are any, else 8 simulated CPU devices).
"""
import os

# Simulate 8 devices on the host platform; has no effect when JAX runs on GPUs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import math
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard, collectives

jax.config.update("jax_default_matmul_precision", "highest")  # exact f32 on GPUs too
TOL = 1e-5
AUX_WEIGHT = 0.01

TOKENS = [Shard(0), Shard(0)]          # every device holds its own tokens
REPLICATED = [Replicate(), Replicate()]
EXPERTS = [Replicate(), Shard(0)]      # experts split over ep, copies over dp
PLACEMENTS = {"router": REPLICATED, "w1": EXPERTS, "w2": EXPERTS}


@dataclass(frozen=True)
class MoEConfig:
    experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25

    def capacity(self, group_tokens: int) -> int:
        """Slots per expert for one group of tokens (one device's tokens)."""
        return math.ceil(self.capacity_factor * group_tokens * self.top_k / self.experts)


# -- routing: the same local function for the sharded body and the reference --
def route(x, router, cfg: MoEConfig):
    """Top-k routing of one group of tokens ``x`` (t, d) with capacity.

    Returns the dispatch mask (t, E, C), the combine weights (t, E, C) (the
    mask times the token's router probability for that expert), the router
    probabilities (t, E) and the tokens assigned to each expert before drops (E,).
    """
    tokens = x.shape[0]
    capacity = cfg.capacity(tokens)
    probs = jax.nn.softmax(x @ router, axis=-1)
    scores, chosen = jax.lax.top_k(probs, cfg.top_k)              # (t, k)
    choice = jax.nn.one_hot(chosen, cfg.experts, dtype=jnp.int32)  # (t, k, E)
    # Queue order: every token's first choice, then every second choice (GShard).
    queue = choice.transpose(1, 0, 2).reshape(cfg.top_k * tokens, cfg.experts)
    slot = (jnp.cumsum(queue, axis=0) - 1) * queue               # position in its expert
    slot = slot.sum(-1).reshape(cfg.top_k, tokens).T              # (t, k)
    kept = (slot < capacity)[..., None, None]
    one_slot = jax.nn.one_hot(slot, capacity, dtype=x.dtype)       # (t, k, C); none if dropped
    per_choice = choice.astype(x.dtype)[..., None] * one_slot[:, :, None, :] * kept
    dispatch = per_choice.sum(1)                                   # (t, E, C)
    combine = (per_choice * scores[:, :, None, None]).sum(1)
    return dispatch, combine, probs, choice.sum((0, 1))


def expert_mlp(inputs, w1, w2):
    """Experts applied as one batched matmul: inputs (e, slots, d), w1 (e, d, h)."""
    return jnp.einsum("esh,ehd->esd", jax.nn.gelu(jnp.einsum("esd,edh->esh", inputs, w1)), w2)


def balance_loss(assigned, prob_sum, total_tokens, cfg: MoEConfig):
    """Switch Transformer's load-balancing loss, E * sum_e f_e * P_e, from the whole
    batch's assignment counts (no gradient) and summed router probabilities."""
    fraction = jax.lax.stop_gradient(assigned / (total_tokens * cfg.top_k))
    return cfg.experts * jnp.sum(fraction * prob_sum / total_tokens)


# -- the sharded layer --------------------------------------------------------
def make_sharded_moe(mesh, cfg: MoEConfig, router_grad=(Partial(), Partial())):
    """The MoE layer as one local_map region. ``router_grad`` declares the placements
    of the router weight's local gradient: Partial over both axes, since every
    device routes different tokens (the tests pass a wrong one on purpose)."""
    in_grad = (None, {"router": list(router_grad), "w1": None, "w2": None})

    @jlm.local_map(out_placements=(TOKENS, REPLICATED),
                   in_placements=(TOKENS, PLACEMENTS), in_grad_placements=in_grad,
                   device_mesh=mesh)
    def moe_layer(x, params):   # x: this device's (t, d) tokens; w1: (E/ep, d, h)
        dispatch, combine, probs, assigned = route(x, params["router"], cfg)
        packed = jnp.einsum("tec,td->ecd", dispatch, x)            # (E, C, d)
        # Expert e's slots go to the ep rank holding it; slots from all ranks arrive
        # side by side: (E/ep, ep * C, d).
        received = collectives.all_to_all_single(packed, 0, 1, "ep")
        outputs = expert_mlp(received, params["w1"], params["w2"])
        returned = collectives.all_to_all_single(outputs, 1, 0, "ep")  # (E, C, d)
        y = jnp.einsum("tec,ecd->td", combine, returned)
        everywhere = ("dp", "ep")
        total = x.shape[0] * mesh.size
        aux = balance_loss(jax.lax.psum(assigned, everywhere),
                           jax.lax.psum(probs.sum(0), everywhere), total, cfg)
        return x + y, aux
    return moe_layer


# -- the unsharded reference: same groups, capacity and drop rule -------------
def reference_moe(x, params, cfg: MoEConfig, groups: int):
    """The MoE layer on one device: the tokens are cut into the same ``groups``
    (one per device of the sharded run), each routed with its own capacity."""
    grouped = x.reshape(groups, -1, x.shape[-1])
    dispatch, combine, probs, assigned = jax.vmap(route, in_axes=(0, None, None))(
        grouped, params["router"], cfg)
    packed = jnp.einsum("gtec,gtd->egcd", dispatch, grouped)
    flat = packed.reshape(cfg.experts, -1, x.shape[-1])
    outputs = expert_mlp(flat, params["w1"], params["w2"]).reshape(packed.shape)
    y = jnp.einsum("gtec,egcd->gtd", combine, outputs).reshape(x.shape)
    aux = balance_loss(assigned.sum(0), probs.sum((0, 1)), x.shape[0], cfg)
    return x + y, aux


def dropped(x, router, cfg: MoEConfig, groups: int) -> int:
    """How many of the top-k assignments the capacity drops."""
    grouped = x.reshape(groups, -1, x.shape[-1])
    dispatch = jax.vmap(route, in_axes=(0, None, None))(grouped, router, cfg)[0]
    return int(x.shape[0] * cfg.top_k - dispatch.sum())


def make_train_step(layer, optimizer):
    def loss_fn(params, x, target):
        y, aux = layer(x, params)
        return jnp.mean((y - target) ** 2) + AUX_WEIGHT * aux

    @jax.jit
    def train_step(params, opt_state, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads
    return train_step


def init_params(rng, dim: int, hidden: int, cfg: MoEConfig) -> dict[str, np.ndarray]:
    def normal(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return {"router": normal(dim, cfg.experts, fan_in=dim),
            "w1": normal(cfg.experts, dim, hidden, fan_in=dim),
            "w2": normal(cfg.experts, hidden, dim, fan_in=hidden)}


def max_diff(sharded, unsharded) -> float:
    leaves = zip(jax.tree.leaves(sharded), jax.tree.leaves(unsharded), strict=True)
    return max(float(np.max(np.abs(np.asarray(jlm.full_tensor(a)) - np.asarray(b))))
               for a, b in leaves)


def make_mesh(parser, args):
    devices = jax.devices()
    n = len(devices)
    dp = 2 if n >= 4 and n % 2 == 0 else 1
    ep = n // dp
    if args.experts % ep or args.tokens % n:
        parser.error(f"--experts must be a multiple of ep={ep} and --tokens of {n} devices")
    print(f"devices: {n} x {devices[0].device_kind} ({devices[0].platform})")
    return jax.make_mesh((dp, ep), ("dp", "ep"), devices=devices)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512, help="global batch of tokens")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    # Adam divides by sqrt(v) + eps: a gradient element near 1e-8 turns a 1e-10
    # rounding difference into lr * 1e-3 of parameter, so keep lr at adamw's usual 1e-3.
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser, parser.parse_args()


def report_communication(mesh, step, *args):
    with jax.set_mesh(mesh):
        comms = jlm.inspect.count_collectives(step, *args)
    done = comms.executed
    # The backward has one all-to-all, not two: x is data, so no cotangent flows
    # back through the dispatch.
    print(f"collectives per train step: {done['all-to-all']} all-to-all, "
          f"{done['all-reduce']} all-reduce, {done['all-gather']} all-gather, "
          f"{done['reduce-scatter']} reduce-scatter")
    print(comms)


def train(mesh, cfg, args, host_params, x, target):
    """Both runs side by side; returns the largest difference seen."""
    optimizer = optax.adamw(args.lr)
    params = {k: jlm.distribute_tensor(v, mesh, PLACEMENTS[k]) for k, v in host_params.items()}
    xs, ts = (jlm.distribute_tensor(a, mesh, TOKENS) for a in (x, target))
    device = jax.devices()[0]
    ref_params, ref_x, ref_t = jax.device_put((host_params, x, target), device)
    with jax.set_mesh(mesh):
        opt_state = optimizer.init(params)
    ref_state = optimizer.init(ref_params)
    sharded_step = make_train_step(make_sharded_moe(mesh, cfg), optimizer)
    ref_step = make_train_step(lambda x, p: reference_moe(x, p, cfg, mesh.size), optimizer)
    report_communication(mesh, sharded_step, params, opt_state, xs, ts)

    worst = 0.0
    for step in range(1, args.steps + 1):
        with jax.set_mesh(mesh):
            params, opt_state, loss, grads = sharded_step(params, opt_state, xs, ts)
        ref_params, ref_state, ref_loss, ref_grads = ref_step(ref_params, ref_state, ref_x, ref_t)
        diffs = (abs(float(loss) - float(ref_loss)), max_diff(grads, ref_grads),
                 max_diff(params, ref_params))
        worst = max(worst, *diffs)
        print(f"step {step}: loss {float(loss):.6f} (unsharded {float(ref_loss):.6f}), "
              f"max |diff| loss {diffs[0]:.1e}, grads {diffs[1]:.1e}, params {diffs[2]:.1e}")
    assert all(jlm.placements_of(params[k]) == tuple(PLACEMENTS[k]) for k in params)
    return worst


def main():
    parser, args = parse_args()
    start = time.perf_counter()
    mesh = make_mesh(parser, args)
    cfg = MoEConfig(args.experts, 2, args.capacity_factor)
    group = args.tokens // mesh.size
    print(f"mesh: {dict(mesh.shape)}; {args.experts} experts, "
          f"top-{cfg.top_k}, capacity {cfg.capacity(group)} slots per expert per "
          f"{group}-token group")

    rng = np.random.default_rng(0)
    host_params = init_params(rng, args.dim, args.hidden, cfg)
    x = rng.standard_normal((args.tokens, args.dim)).astype(np.float32)
    target = np.sin(x @ rng.standard_normal((args.dim, args.dim))).astype(np.float32)
    y, aux = reference_moe(x, host_params, cfg, mesh.size)
    with jax.set_mesh(mesh):
        ys, auxs = make_sharded_moe(mesh, cfg)(x, host_params)
    forward = max(max_diff(ys, y), abs(float(auxs) - float(aux)))
    print(f"forward: max |diff| {forward:.1e} (aux loss {float(aux):.4f}; capacity drops "
          f"{dropped(x, host_params['router'], cfg, mesh.size)} of {args.tokens * cfg.top_k} "
          f"assignments)")

    worst = max(forward, train(mesh, cfg, args, host_params, x, target))
    print(f"run time {time.perf_counter() - start:.1f} s")
    print(f"max |sharded - unsharded| = {worst:.2e}")
    if worst > TOL:
        print(f"FAILED: exceeds tolerance {TOL}")
        sys.exit(1)


if __name__ == "__main__":
    main()
