"""A Flax NNX model whose layers run in ``jlocalmap.local_map``, trained with Optax.

The model is a residual stack of Megatron MLP blocks (RMSNorm -> column-parallel
linear -> GELU -> row-parallel linear) and a linear readout, on a ``(dp, tp)``
mesh. Each linear layer is an ``nnx.Module`` whose ``__call__`` runs its local
matmul in a ``jlm.local_map`` region:

* ``ColumnParallelLinear``: kernel ``[Replicate(), Shard(1)]``, bias
  ``[Replicate(), Shard(0)]``; each tp rank computes its slice of the outputs;
* ``RowParallelLinear``: kernel ``[Replicate(), Shard(0)]``, bias replicated;
  each tp rank's partial product is summed over tp in the body, and the bias is
  added once, after the sum.

Parameters carry their layout as NNX sharding metadata (``out_sharding``), written
from DTensor placements with ``jlm.placements_to_spec``; created under
``jax.set_mesh(mesh)`` they are laid out as they are made (Flax's eager sharding),
and ``nnx.Optimizer(model, optax.adamw(...))`` keeps its moments in the same
layouts. The weights' ``in_grad_placements`` state what torchtitan declares
(``Partial()`` over dp: each batch shard's gradient is a summand); jlocalmap checks
them against JAX's typing. An ``nnx.jit`` train step runs 5 steps; the same module
built without a mesh runs unsharded on one device, and the script exits with
status 1 if loss, parameters or gradients differ by more than 1e-4.
See docs/flax_nnx.md.

Run:  python examples/flax_nnx.py [--steps 5] [--hidden 64] [--batch 32]
(uses the GPUs if there are any, else 8 simulated CPU devices).
"""
import os

# Simulate 8 devices on the host platform; has no effect when JAX runs on GPUs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

jax.config.update("jax_default_matmul_precision", "highest")  # exact f32 on GPUs too
TOL = 1e-4
R = Replicate()
ACTIVATION = [Shard(0), R]   # (batch, features) on (dp, tp): batch split, features whole
HIDDEN = [Shard(0), Shard(1)]  # (batch, hidden): hidden units split over tp


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # A host initializer: on a 2-core CPU, compiling jax.random's initializers
    # (nnx.Rngs draws from them) for these 20 parameters took 8-13 s, longer than
    # the whole training. The layout comes from the Param's metadata either way.
    return rng.standard_normal(shape).astype(np.float32)


def param(value: np.ndarray, mesh, placements) -> nnx.Param:
    """An ``nnx.Param`` whose sharding metadata is ``placements`` on ``mesh``
    (none without a mesh: the unsharded model)."""
    if mesh is None:
        return nnx.Param(value)
    return nnx.Param(value, out_sharding=jlm.placements_to_spec(placements, mesh, value.ndim))


def dp_summand(placements):
    """The gradient placements of a weight replicated over dp: its gradient from
    one batch shard is a summand over dp (torchtitan's declaration)."""
    return [Partial(), *placements[1:]]


class ParallelLinear(nnx.Module):
    """``x @ kernel + bias`` as a local_map region; subclasses set the layouts
    (class constants, read by both the Params' metadata and the region)."""
    KERNEL: list
    BIAS: list
    IN: list
    OUT: list

    def __init__(self, d_in: int, d_out: int, *, mesh, rng: np.random.Generator):
        self.kernel = param(normal(rng, d_in, d_out) / np.sqrt(d_in), mesh, self.KERNEL)
        self.bias = param(0.1 * normal(rng, d_out), mesh, self.BIAS)
        self.mesh = mesh

    @staticmethod
    def body(x, w, b):
        return x @ w + b

    def __call__(self, x):
        if self.mesh is None:  # the unsharded module: the same math on one device
            return x @ self.kernel[...] + self.bias[...]
        region = jlm.local_map(
            self.body, out_placements=self.OUT, in_placements=(self.IN, self.KERNEL, self.BIAS),
            in_grad_placements=(None, dp_summand(self.KERNEL), dp_summand(self.BIAS)),
            device_mesh=self.mesh)
        return region(x, self.kernel[...], self.bias[...])


class ColumnParallelLinear(ParallelLinear):
    """Output features split over tp: each tp rank computes its slice, no communication."""
    KERNEL, BIAS, IN, OUT = [R, Shard(1)], [R, Shard(0)], ACTIVATION, HIDDEN


class RowParallelLinear(ParallelLinear):
    """Input features split over tp: the partial products are summed over tp,
    then the (replicated) bias is added once."""
    KERNEL, BIAS, IN, OUT = [R, Shard(0)], [R, R], HIDDEN, ACTIVATION

    @staticmethod
    def body(h, w, b):
        return jax.lax.psum(h @ w, "tp") + b


class RMSNorm(nnx.Module):
    """Plain JAX: the activation is whole on every tp rank, the scale replicated."""

    def __init__(self, dim: int, *, mesh, rng: np.random.Generator):
        self.scale = param(1 + 0.1 * normal(rng, dim), mesh, [R, R])

    def __call__(self, x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.scale[...]


class Block(nnx.Module):
    """x + down(gelu(up(norm(x)))): a Megatron MLP with a residual."""

    def __init__(self, dim: int, hidden: int, *, mesh, rng: np.random.Generator):
        self.norm = RMSNorm(dim, mesh=mesh, rng=rng)
        self.up = ColumnParallelLinear(dim, hidden, mesh=mesh, rng=rng)
        self.down = RowParallelLinear(hidden, dim, mesh=mesh, rng=rng)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Model(nnx.Module):
    """Residual MLP blocks and a readout; ``mesh=None`` builds it unsharded."""

    def __init__(self, dim: int, hidden: int, out: int, layers: int, *,
                 mesh: Optional[jax.sharding.Mesh], rng: np.random.Generator):
        self.blocks = nnx.List([Block(dim, hidden, mesh=mesh, rng=rng) for _ in range(layers)])
        self.norm = RMSNorm(dim, mesh=mesh, rng=rng)
        self.up = ColumnParallelLinear(dim, hidden, mesh=mesh, rng=rng)
        self.readout = RowParallelLinear(hidden, out, mesh=mesh, rng=rng)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.readout(jax.nn.gelu(self.up(self.norm(x))))


def make_optimizer(model: nnx.Module, lr: float) -> nnx.Optimizer:
    # eps = 1e-5: see examples/transformer.py (Adam turns float32 rounding noise
    # in a near-zero gradient into a step of about lr).
    return nnx.Optimizer(model, optax.adamw(lr, eps=1e-5), wrt=nnx.Param)


@nnx.jit
def train_step(model: Model, optimizer: nnx.Optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads


def max_diff(tree, ref_tree) -> float:
    """Largest |sharded - unsharded| over every entry of two trees of arrays."""
    return max(float(np.max(np.abs(np.asarray(jlm.full_tensor(a)) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree), strict=True))


def build(mesh, args, seed: int = 0):
    """The model (sharded on ``mesh``, or unsharded for None) and its optimizer,
    from the same random seed."""
    def make():
        model = Model(args.dim, args.hidden, args.out, args.layers, mesh=mesh,
                      rng=np.random.default_rng(seed))
        return model, make_optimizer(model, args.lr)
    if mesh is None:
        return make()
    with jax.set_mesh(mesh):  # annotated Params are laid out as they are created
        return make()


def check_layouts(model: Model, mesh) -> None:
    """Every parameter has the placements its layer declares."""
    for layer in (model.up, model.readout, *(b.up for b in model.blocks),
                  *(b.down for b in model.blocks)):
        got = jlm.placements_of(layer.kernel[...]), jlm.placements_of(layer.bias[...])
        assert got == (tuple(layer.KERNEL), tuple(layer.BIAS)), (type(layer).__name__, got)


def train_and_compare(mesh, args, x, y, log=print) -> list[dict]:
    """Train the sharded and the unsharded model side by side; per step return
    the loss and the largest differences of loss, parameters and gradients."""
    model, optimizer = build(mesh, args)
    check_layouts(model, mesh)
    ref_model, ref_optimizer = build(None, args)
    xs, ys = (jlm.distribute_tensor(a, mesh, ACTIVATION) for a in (x, y))
    with jax.set_mesh(mesh):
        # Compile once: the collectives are read from the program that then runs.
        step = train_step.lower(model, optimizer, xs, ys).compile()
    log(f"collectives per training step:\n{jlm.inspect.collectives_in_hlo(step.as_text())}")
    history = []
    for i in range(1, args.steps + 1):
        with jax.set_mesh(mesh):
            loss, grads = step(model, optimizer, xs, ys)
        ref_loss, ref_grads = train_step(ref_model, ref_optimizer, x, y)
        history.append({"loss": float(loss), "loss_diff": abs(float(loss) - float(ref_loss)),
                        "param_diff": max_diff(nnx.state(model, nnx.Param),
                                               nnx.state(ref_model, nnx.Param)),
                        "grad_diff": max_diff(grads, ref_grads)})
        log("step {}: loss {loss:.6f}  max |loss diff| {loss_diff:.2e}  max |param diff| "
            "{param_diff:.2e}  max |grad diff| {grad_diff:.2e}".format(i, **history[-1]))
    return history


def main(argv=None) -> float:
    """Run the comparison from command-line flags; return the largest difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("steps", 5), ("dim", 16), ("hidden", 64), ("out", 8),
                          ("layers", 2), ("batch", 32)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    devices = jax.devices()
    dp, tp = (2, len(devices) // 2) if len(devices) % 2 == 0 else (1, len(devices))
    if args.hidden % tp or args.batch % dp:
        parser.error(f"--hidden must be a multiple of tp={tp} and --batch of dp={dp}")
    mesh = jax.make_mesh((dp, tp), ("dp", "tp"), devices=devices)
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
          f"mesh: {dict(mesh.shape)}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.dim)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal((args.dim, args.out))).astype(np.float32)
    history = train_and_compare(mesh, args, x, y)
    worst = max(max(h["loss_diff"], h["param_diff"], h["grad_diff"]) for h in history)
    print(f"max |sharded - unsharded| = {worst:.2e}")
    return worst


if __name__ == "__main__":
    if main() > TOL:
        print(f"FAILED: above the tolerance {TOL}", file=sys.stderr)
        sys.exit(1)
