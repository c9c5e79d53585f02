"""Megatron-style tensor-parallel MLP trained with ``jlocalmap.local_map``.

The model is ``y = gelu(x @ W1) @ W2`` on a ``(dp, tp)`` device mesh:

* ``x`` (and the target) are batch-sharded over ``dp`` and replicated over ``tp``;
* ``W1`` is column-sharded (``Shard(1)`` on ``tp``), so each device computes its
  own slice of the hidden activations with no communication;
* ``W2`` is row-sharded (``Shard(0)`` on ``tp``), so each device produces a
  partial sum of the output, which the body reduces with ``jax.lax.psum(.., "tp")``
  and returns as ``Replicate()`` on ``tp``.

Both matmuls are written for *local* shards, exactly as in PyTorch DTensor's
``local_map``. The training step (``jax.value_and_grad`` + plain SGD) is jitted
and differentiates straight through the local_map regions. Every step is checked
against the same math run unsharded on one device; the script exits with status 1
if they disagree by more than 1e-4.

Run:  PYTHONPATH=. python examples/tp_mlp.py [--steps 5] [--hidden 64] [--batch 32]
(uses the GPUs if there are any, else 8 simulated CPU devices).
"""
import os

# Simulate 8 devices on the host platform; has no effect when JAX runs on GPUs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jlocalmap as jlm
from jlocalmap import Replicate, Shard

jax.config.update("jax_default_matmul_precision", "highest")  # exact f32 on GPUs too
D_IN, D_OUT, LR, TOL = 16, 8, 0.1, 1e-4


def mlp(params, x):  # the unsharded reference: plain jnp, same math
    return jax.nn.gelu(x @ params["w1"]) @ params["w2"]


def make_sharded_mlp(mesh):
    # Placement lists have one entry per mesh axis: (dp, tp).
    @jlm.local_map(out_placements=[Shard(0), Shard(1)],
                   in_placements=([Shard(0), Replicate()], [Replicate(), Shard(1)]),
                   device_mesh=mesh)
    def column_parallel(x, w1):  # local: (b, d_in) @ (d_in, h/tp) -> (b, h/tp)
        return jax.nn.gelu(x @ w1)

    @jlm.local_map(out_placements=[Shard(0), Replicate()],
                   in_placements=([Shard(0), Shard(1)], [Replicate(), Shard(0)]),
                   device_mesh=mesh)
    def row_parallel(h, w2):  # local partial sums (b, d_out), summed over tp
        return jax.lax.psum(h @ w2, "tp")

    return lambda params, x: row_parallel(column_parallel(x, params["w1"]), params["w2"])


def make_train_step(model):
    def loss_fn(params, x, y):
        return jnp.mean((model(params, x) - y) ** 2)

    @jax.jit
    def train_step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss
    return train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    devices = jax.devices()
    n = len(devices)
    dp, tp = (2, n // 2) if n >= 4 and n % 2 == 0 else (1, n)
    if args.hidden % tp or args.batch % dp:
        parser.error(f"--hidden must be a multiple of tp={tp} and --batch of dp={dp}")
    mesh = jax.make_mesh((dp, tp), ("dp", "tp"), devices=devices)
    print(f"devices: {n} x {devices[0].device_kind} ({devices[0].platform})")
    print(f"mesh: {dict(mesh.shape)}")

    rng = np.random.default_rng(0)
    host = {"w1": rng.standard_normal((D_IN, args.hidden)) / np.sqrt(D_IN),
            "w2": rng.standard_normal((args.hidden, D_OUT)) / np.sqrt(args.hidden)}
    host = {k: v.astype(np.float32) for k, v in host.items()}
    x = rng.standard_normal((args.batch, D_IN)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal((D_IN, D_OUT))).astype(np.float32)

    placements = {"w1": [Replicate(), Shard(1)], "w2": [Replicate(), Shard(0)]}
    params = {k: jlm.distribute_tensor(v, mesh, placements[k]) for k, v in host.items()}
    xs, ys = (jlm.distribute_tensor(a, mesh, [Shard(0), Replicate()]) for a in (x, y))
    ref_params = jax.device_put(host, devices[0])
    ref_x, ref_y = jax.device_put((x, y), devices[0])

    sharded_model = make_sharded_mlp(mesh)
    sharded_step = make_train_step(sharded_model)
    ref_step = make_train_step(mlp)
    with jax.set_mesh(mesh):  # communication of one forward pass and one training step
        forward = jlm.inspect.count_collectives(sharded_model, params, xs)
        step = jlm.inspect.count_collectives(sharded_step, params, xs, ys)
    print(f"forward: {forward.counts['all-reduce']} all-reduce "
          f"({forward.bytes['all-reduce']} B/device); training step collectives:")
    print(step)
    worst = 0.0
    for step in range(1, args.steps + 1):
        with jax.set_mesh(mesh):
            params, loss = sharded_step(params, xs, ys)
        ref_params, ref_loss = ref_step(ref_params, ref_x, ref_y)
        diff = max(float(np.max(np.abs(np.asarray(jlm.full_tensor(params[k]))
                                       - np.asarray(ref_params[k])))) for k in params)
        worst = max(worst, diff, abs(float(loss) - float(ref_loss)))
        print(f"step {step}: loss {float(loss):.6f} (unsharded {float(ref_loss):.6f}), "
              f"max |param diff| {diff:.2e}")

    assert all(jlm.placements_of(params[k]) == tuple(placements[k]) for k in params)
    print(f"max |sharded - unsharded| = {worst:.2e}  (over all steps)")
    if worst > TOL:
        print(f"FAILED: exceeds tolerance {TOL}")
        sys.exit(1)


if __name__ == "__main__":
    main()
