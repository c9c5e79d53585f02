"""jlocalmap's side of the parity cases: the same programs on ``world_size``
of the (simulated) JAX devices, with the mesh shapes PyTorch uses.

    >>> from cases import CASES
    >>> r = run_case(CASES["matmul_partial_out"], 4)
    >>> r["out"].shape, [g.shape for g in r["grads"]]
    ((16, 12), [(16, 8), (8, 12)])

Every case returns ``{"out": full output, "grads": [full gradient per array
input]}`` as numpy arrays, or ``{"error": "Type: message"}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard
from cases import Case, case_inputs, cotangent, given_mesh, mesh_shape, placements

AXES = {"line": ("tp",), "grid": ("dp", "tp")}


def to_placements(tokens: tuple[str, ...] | None) -> list | None:
    """``("S0", "R")`` -> ``[Shard(0), Replicate()]``."""
    if tokens is None:
        return None
    return [Replicate() if t == "R" else Partial() if t == "P" else Shard(int(t[1:])) for t in tokens]


def _mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2


# The local bodies. One psum serves all three Megatron variants: its transpose is
# already right (Megatron's g), and the input's all-reduce (f) is JAX's implicit pvary.
BODIES = {
    "mm": lambda x, w: x @ w,
    "mul": lambda x, s: x * s,
    "mm_allreduce": lambda x, w: jax.lax.psum(x @ w, "tp"),
    "mlp_allreduce": lambda x, w1, w2: jax.lax.psum(_mlp(x, w1, w2), "tp"),
    "mlp_g": lambda x, w1, w2: jax.lax.psum(_mlp(x, w1, w2), "tp"),
    "mlp_f_g": lambda x, w1, w2: jax.lax.psum(_mlp(x, w1, w2), "tp"),
    # A traced body has no Python bool to return: the gathered comparison stays an array.
    "equal_allgather": lambda x, y: jnp.all(jlm.collectives.all_gather_tensor(
        jnp.array_equal(x, y)[None], 0, "tp")),
    "mm_allgather": lambda a, b: jlm.collectives.all_gather_tensor(a @ b, 0, "tp"),
}


# Under a trace an input on another mesh is refused (a tracer carries no devices);
# the error's fix is to move it before the trace: here, onto the grid mesh, where
# the 1-D mesh's Shard(1) is [Shard(1), Shard(1)] (no data moves).
MOVE_BEFORE_TRACE = {"multi_mesh": {0: "S1,S1"}}


def meshes_for(world_size: int) -> dict:
    """The "line" and "grid" meshes on the first ``world_size`` devices."""
    devices = jax.devices()[:world_size]
    return {kind: jax.make_mesh(mesh_shape(kind, world_size), AXES[kind], devices=devices)
            for kind in AXES}


def _hold(value, given: str, meshes: dict):
    """The input as a JAX user holds it: distributed, a host (global) array, or a float."""
    kind, pl = given_mesh(given)
    if kind in ("host", "scalar"):
        return value
    return jlm.distribute_tensor(value, meshes[kind], to_placements(pl))


def _wrapped(case: Case, meshes: dict, moved: dict):
    in_pl = case.in_pl and tuple(moved.get(i, e) for i, e in enumerate(case.in_pl))
    entries = None if in_pl is None else tuple(to_placements(placements(e)) for e in in_pl)
    grads = None if case.in_grad is None else tuple(to_placements(placements(e)) for e in case.in_grad)
    return jlm.local_map(BODIES[case.body], out_placements=to_placements(placements(case.out_pl)),
                         in_placements=entries, in_grad_placements=grads,
                         device_mesh=meshes[case.mesh], redistribute_inputs=case.redistribute)


def _gradients(f, args: list, arrays: list[int], g: np.ndarray) -> list[np.ndarray]:
    """The full gradients of ``sum(full_tensor(f(*args)) * g)`` for ``args[i], i in arrays``."""
    def full_output(*picked):
        call = list(args)
        for i, a in zip(arrays, picked, strict=True):
            call[i] = a
        return jlm.full_tensor(f(*call))

    def grads(*picked):
        return jax.vjp(full_output, *picked)[1](jnp.asarray(g))

    return [np.asarray(jlm.full_tensor(x)) for x in jax.jit(grads)(*[args[i] for i in arrays])]


def run_case(case: Case, world_size: int, meshes: dict | None = None) -> dict:
    """One case: the full output (called eagerly, as a user calls it) and the full
    gradients of ``sum(out * G)`` (under ``jax.jit``)."""
    meshes = meshes or meshes_for(world_size)
    args = [_hold(v, g, meshes) for v, g in zip(case_inputs(case, world_size), case.given, strict=True)]
    try:
        out = np.asarray(jlm.full_tensor(_wrapped(case, meshes, {})(*args)))
        if not case.grads:
            return {"out": out}
        moved = MOVE_BEFORE_TRACE.get(case.name, {})
        for i, entry in moved.items():
            args[i] = jlm.distribute_tensor(args[i], meshes[case.mesh], to_placements(placements(entry)))
        arrays = [i for i, g in enumerate(case.given) if given_mesh(g)[0] not in ("host", "scalar")]
        grads = _gradients(_wrapped(case, meshes, moved), args, arrays, cotangent(case, world_size))
    except ValueError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"out": out, "grads": grads}
