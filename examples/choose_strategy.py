"""One MLP region, three strategies: jlocalmap picks the cheapest per size.

The region is the transformer MLP ``y = gelu(x @ W1) @ W2`` on a 1-D ``tp`` mesh,
with the activations sequence-sharded (``x`` and ``y`` ``Shard(0)``, as between
the layers of Megatron's sequence parallelism) and the weights stored
column/row-sharded (``W1`` ``Shard(1)``, ``W2`` ``Shard(0)``). It is written
three ways, each a ``local_map`` with its own placements and gradient
declarations:

* ``tensor-parallel``: Megatron column/row parallel. ``x`` is gathered to
  ``Replicate`` (its gradient declared ``Partial``), the body returns partial
  sums (``Partial``), which the region reduce-scatters back to ``Shard(0)``:
  communication grows with the tokens.
* ``seq-parallel-ring``: the same collectives as rings of ``ppermute`` fused with
  the matmuls (``jlm.collectives.all_gather_matmul`` / ``matmul_reduce_scatter``).
* ``fsdp``: the weights are gathered (their gradients reduce-scattered) and each
  device runs the whole MLP on its own tokens: communication is the weights', a
  constant.

For each token count the region prices each alternative's compiled training
step with the cost model, times it on the devices (``choose="measure"``, cached),
and runs the measured-fastest one. The table shows the flip: tensor parallel for
few tokens, FSDP once the activations outweigh the weights. Every size's values
and gradients are checked against the unsharded MLP on one device; the script
exits 1 if they differ by more than 1e-4.

Run:  PYTHONPATH=. python examples/choose_strategy.py [--tokens 64,256,1024,4096]
(uses the GPUs if there are any, else 8 simulated CPU devices).
"""
import os

# Simulate 8 devices on the host platform; has no effect when JAX runs on GPUs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard, collectives

jax.config.update("jax_default_matmul_precision", "highest")  # exact f32 on GPUs too
TOL = 1e-4


def gelu(x):
    return jax.nn.gelu(x, approximate=True)


def mlp(x, w1, w2):  # the unsharded reference
    return gelu(x @ w1) @ w2


def make_alternatives(mesh):
    @jlm.local_map(out_placements=[Partial()],
                   in_placements=([Replicate()], [Shard(1)], [Shard(0)]),
                   in_grad_placements=([Partial()], [Shard(1)], [Shard(0)]), device_mesh=mesh)
    def tensor_parallel(x, w1, w2):  # local (T, d) @ (d, f/tp) @ (f/tp, d): partial sums
        return gelu(x @ w1) @ w2

    @jlm.local_map(out_placements=[Shard(0)],
                   in_placements=([Shard(0)], [Shard(1)], [Shard(0)]), device_mesh=mesh)
    def seq_parallel_ring(x, w1, w2):  # gather tokens / scatter outputs behind the matmuls
        h = gelu(collectives.all_gather_matmul(x, w1, 0, "tp"))
        return collectives.matmul_reduce_scatter(h, w2, 0, "tp")

    @jlm.local_map(out_placements=[Shard(0)],
                   in_placements=([Shard(0)], [Shard(1)], [Shard(0)]), device_mesh=mesh)
    def fsdp(x, w1, w2):  # whole weights, this device's tokens
        w1 = jax.lax.all_gather(w1, "tp", axis=1, tiled=True)
        w2 = jax.lax.all_gather(w2, "tp", axis=0, tiled=True)
        return gelu(x @ w1) @ w2

    return {"tensor-parallel": tensor_parallel, "seq-parallel-ring": seq_parallel_ring,
            "fsdp": fsdp}


def check_against_unsharded(region, mesh, host, device):
    """max |difference| of the loss and gradients of one jitted step."""
    def loss(f):
        return lambda x, w1, w2: jnp.sum(f(x, w1, w2) ** 2)
    x, w1, w2 = (jlm.distribute_tensor(a, mesh, p) for a, p in
                 zip(host, ([Shard(0)], [Shard(1)], [Shard(0)]), strict=True))
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss(region), argnums=(0, 1, 2)))(x, w1, w2)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss(mlp), argnums=(0, 1, 2)))(
        *jax.device_put(host, device))
    scale = max(1.0, abs(float(ref_value)))
    worst = abs(float(value) - float(ref_value)) / scale
    for g, r in zip(grads, ref_grads, strict=True):
        worst = max(worst, float(np.max(np.abs(np.asarray(jlm.full_tensor(g)) - np.asarray(r))))
                    / max(1.0, float(np.max(np.abs(np.asarray(r))))))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64,256,1024,4096",
                        help="comma-separated token counts (multiples of the device count)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--choose", choices=("measure", "cost"), default="measure")
    parser.add_argument("--cache-dir", default=None,
                        help="measure cache folder (default $JLOCALMAP_CACHE_DIR, else "
                             "~/.cache/jlocalmap)")
    args = parser.parse_args()
    devices = jax.devices()
    n = len(devices)
    tokens = [int(t) for t in args.tokens.split(",")]
    if any(t % n for t in tokens) or args.d_ff % n:
        parser.error(f"--tokens and --d-ff must be multiples of the {n} devices")
    mesh = jax.make_mesh((n,), ("tp",), devices=devices)
    print(f"devices: {n} x {devices[0].device_kind} ({devices[0].platform}); "
          f"d_model {args.d_model}, d_ff {args.d_ff}")
    region = jlm.strategies.strategy_region(make_alternatives(mesh), choose=args.choose,
                                 out_placements=[Shard(0)], cache_dir=args.cache_dir,
                                 name="mlp")
    rng = np.random.default_rng(0)
    d, f = args.d_model, args.d_ff
    weights = ((rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32),
               (rng.standard_normal((f, d)) / np.sqrt(f)).astype(np.float32))
    worst, summary = 0.0, []
    for t in tokens:
        start = time.perf_counter()
        host = (rng.standard_normal((t, d)).astype(np.float32),) + weights
        x = jlm.distribute_tensor(host[0], mesh, [Shard(0)])
        w1, w2 = (jlm.distribute_tensor(w, mesh, p) for w, p in
                  zip(weights, ([Shard(1)], [Shard(0)]), strict=True))
        choice = region.choice(x, w1, w2)
        print(f"\n== tokens {t} ==\n{choice}")
        diff = check_against_unsharded(region, mesh, host, devices[0])
        worst = max(worst, diff)
        summary.append((t, choice.predicted, choice.chosen))
        print(f"step vs unsharded: max rel. diff {diff:.2e}  ({time.perf_counter() - start:.1f} s)")
    print("\ntokens  cost model picks     fastest measured")
    for t, predicted, chosen in summary:
        print(f"{t:6d}  {predicted:<20s} {chosen}")
    print(f"max |sharded - unsharded| = {worst:.2e}  (relative, over all sizes)")
    if worst > TOL:
        print(f"FAILED: exceeds tolerance {TOL}")
        sys.exit(1)


if __name__ == "__main__":
    main()
