"""One gradient all-reduce per step with k microbatches (data parallelism).

The replicated weight's per-device gradient is a *Partial* value: each device
holds its summand. Accumulating the k microbatch gradients while they are still
Partial and reducing once per step moves 1/k of the bytes of reducing every
microbatch, with the same result. The body marks the weight varying
(``jax.lax.pcast(w, "dp", to="varying")``) so that ``jax.grad`` inside it returns
the local summand instead of reducing it at once.

Prints the result difference against the unsharded computation and the
all-reduces executed per step (collectives inside the microbatch loop count once
per iteration).

Run:  python examples/dp_microbatches.py [--microbatches 4]
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

jax.config.update("jax_default_matmul_precision", "highest")


def loss(w, x, y):
    return jnp.sum((jnp.tanh(x @ w) - y) ** 2)


def make_steps(mesh):
    @jlm.local_map(out_placements=[Partial()],
                   in_placements=([Replicate()], [Shard(0)], [Shard(0)]), device_mesh=mesh)
    def local_grad(w, x, y):
        w = jax.lax.pcast(w, "dp", to="varying")  # keep this device's summand
        return jax.grad(loss)(w, x, y)

    def reduce_once(w, xs, ys):
        def accumulate(acc, batch):
            return acc + local_grad(w, *batch), None
        first = local_grad(w, xs[0], ys[0])
        partial_sum, _ = jax.lax.scan(accumulate, first, (xs[1:], ys[1:]))
        return jlm.redistribute(partial_sum, mesh, [Replicate()])

    def reduce_every_microbatch(w, xs, ys):
        def accumulate(acc, batch):
            return acc + jlm.redistribute(local_grad(w, *batch), mesh, [Replicate()]), None
        total, _ = jax.lax.scan(accumulate, jnp.zeros(w.shape, w.dtype), (xs, ys))
        return total

    return reduce_once, reduce_every_microbatch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=4)
    args = parser.parse_args()
    k, n = args.microbatches, len(jax.devices())
    mesh = jax.make_mesh((n,), ("dp",))
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 4)).astype(np.float32)
    X = rng.standard_normal((k, 4 * n, 16)).astype(np.float32)
    Y = rng.standard_normal((k, 4 * n, 4)).astype(np.float32)
    reference = sum(jax.grad(loss)(W, X[i], Y[i]) for i in range(k))

    w = jlm.distribute_tensor(W, mesh, [Replicate()])
    xs, ys = (jlm.distribute_tensor(a, mesh, [Replicate()]) for a in (X, Y))
    xs, ys = (jlm.redistribute(a, mesh, [Shard(1)]) for a in (xs, ys))
    worst = 0.0
    print(f"{n} devices, {k} microbatches")
    for step in make_steps(mesh):
        with jax.set_mesh(mesh):
            grad = jax.jit(step)(w, xs, ys)
            counts = jlm.inspect.count_collectives(step, w, xs, ys)
        diff = float(np.max(np.abs(np.asarray(grad) - np.asarray(reference))))
        worst = max(worst, diff)
        print(f"{step.__name__:24s} all-reduces per step: {counts.executed['all-reduce']}, "
              f"bytes: {counts.executed_bytes['all-reduce']}, max |diff| vs unsharded: {diff:.2e}")
    print(f"max |sharded - unsharded| = {worst:.2e}")
    sys.exit(1 if worst > 1e-4 else 0)


if __name__ == "__main__":
    main()
