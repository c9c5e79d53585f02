"""PyTorch's side of the parity cases: DTensor ``local_map`` on a gloo group of
CPU processes. No JAX here (the spawned processes import this module).

    from torch_world import run_world
    per_rank = run_world(run_all, 4)          # per_rank[0]["matmul_partial_out"]["out"]: (16, 12)

Every case returns, on every rank, ``{"out": full output, "grads": [full
gradient per array input]}`` as numpy arrays, or ``{"error": "Type: message"}``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map

from cases import CASES, Case, case_inputs, cotangent, given_mesh, mesh_shape, placements


def to_placements(tokens: tuple[str, ...] | None) -> list | None:
    """``("S0", "R")`` -> ``[Shard(0), Replicate()]``."""
    if tokens is None:
        return None
    return [Replicate() if t == "R" else Partial() if t == "P" else Shard(int(t[1:])) for t in tokens]


def _all_reduce(y: torch.Tensor, mesh) -> torch.Tensor:
    return funcol.all_reduce(y, "sum", mesh).wait()


def _equal_allgather(mesh, x, y) -> bool:
    """PyTorch's test body: a Python bool from the gathered local comparisons."""
    eq = torch.tensor([torch.equal(x, y)])
    return torch.all(funcol.all_gather_tensor(eq, 0, mesh)).item()


class AllReduceIdentityBackward(torch.autograd.Function):
    """Megatron's ``g``: all-reduce in the forward, identity in the backward."""

    @staticmethod
    def forward(ctx, y, mesh):
        return _all_reduce(y, mesh)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class IdentityAllReduceBackward(torch.autograd.Function):
    """Megatron's ``f``: identity in the forward, all-reduce in the backward."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.mesh), None


# The local bodies; those taking a mesh get it as their first argument (entry None).
BODIES = {
    "mm": lambda x, w: torch.mm(x, w),
    "mul": lambda x, s: torch.mul(x, s),
    "mm_allreduce": lambda mesh, x, w: _all_reduce(torch.mm(x, w), mesh),
    "mlp_allreduce": lambda mesh, x, w1, w2: _all_reduce(torch.tanh(x @ w1) @ w2, mesh),
    "mlp_g": lambda mesh, x, w1, w2: AllReduceIdentityBackward.apply(torch.tanh(x @ w1) @ w2, mesh),
    "mlp_f_g": lambda mesh, x, w1, w2: AllReduceIdentityBackward.apply(
        torch.tanh(IdentityAllReduceBackward.apply(x, mesh) @ w1) @ w2, mesh),
    "equal_allgather": _equal_allgather,
    "mm_allgather": lambda mesh, a, b: funcol.all_gather_tensor(torch.mm(a, b), 0, mesh),
}
TAKES_MESH = {"mm_allreduce", "mlp_allreduce", "mlp_g", "mlp_f_g", "equal_allgather",
              "mm_allgather"}


def _hold(value, given: str, entry, meshes: dict):
    """The input as the caller holds it: a DTensor, a local chunk, or a float."""
    if isinstance(value, float):
        return value
    kind, pl = given_mesh(given)
    tensor = torch.from_numpy(value)
    if kind == "host":                       # PyTorch takes a plain tensor as local: pass the chunk
        return distribute_tensor(tensor, meshes["line"], to_placements(placements(entry))).to_local()
    return distribute_tensor(tensor, meshes[kind], to_placements(pl)).requires_grad_()


def _full(y, case: Case, meshes: dict) -> torch.Tensor:
    if isinstance(y, DTensor):
        return y.full_tensor()
    return DTensor.from_local(y, meshes[case.mesh], to_placements(placements(case.out_pl))).full_tensor()


def _wrapped(case: Case, meshes: dict):
    entries = None if case.in_pl is None else [to_placements(placements(e)) for e in case.in_pl]
    grads = None if case.in_grad is None else [to_placements(placements(e)) for e in case.in_grad]
    mesh = meshes[case.mesh]
    if case.body in TAKES_MESH:
        entries = None if entries is None else [None] + entries
        grads = None if grads is None else [None] + grads
    out_pl = case.out_pl if case.torch_out_pl is None else case.torch_out_pl
    f = local_map(BODIES[case.body],
                  out_placements=None if out_pl == "none" else to_placements(placements(out_pl)),
                  in_placements=entries, in_grad_placements=grads, device_mesh=mesh,
                  redistribute_inputs=case.redistribute)
    return (lambda *a: f(mesh, *a)) if case.body in TAKES_MESH else f


def _global_result(out, args: list, case: Case, world_size: int, meshes: dict) -> dict:
    """Through DTensor's own ``full_tensor``, as a PyTorch user reads results."""
    full = _full(out, case, meshes)
    result = {"out": full.detach().numpy()}
    if case.grads:
        (full * torch.from_numpy(cotangent(case, world_size))).sum().backward()
        result["grads"] = [a.grad.full_tensor().numpy() for a in args if isinstance(a, DTensor)]
    return result


def _local_result(out, args: list, case: Case, world_size: int, meshes: dict) -> dict:
    """This rank's local output and gradients (of its share of the loss), with the
    global shape the output DTensor claims: for uneven outputs ``full_tensor``
    breaks (local_map's ``from_local`` assumes even chunks), so the parent assembles."""
    out_pl = to_placements(placements(case.out_pl))
    g = distribute_tensor(torch.from_numpy(cotangent(case, world_size)), meshes[case.mesh], out_pl)
    (out.to_local() * g.to_local()).sum().backward()
    return {"local_out": out.to_local().detach().numpy(), "claimed_shape": tuple(out.shape),
            "local_grads": [a.grad.to_local().numpy() for a in args if isinstance(a, DTensor)]}


def run_case(case: Case, world_size: int, meshes: dict) -> dict:
    """One case on this rank: the full output and the full gradients of ``sum(out * G)``
    (for uneven cases, the local ones: see ``_local_result``)."""
    entries = case.in_pl or (None,) * len(case.given)
    args = [_hold(v, g, e, meshes) for v, g, e in zip(case_inputs(case, world_size), case.given, entries, strict=True)]
    try:
        out = _wrapped(case, meshes)(*args)
    except (AssertionError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if case.torch_plain:   # the global value itself, not a DTensor
        assert not isinstance(out, DTensor), type(out)
        return {"out": np.asarray(out if isinstance(out, bool) else out.numpy())}
    read = _local_result if case.torch_wrong == "uneven_shape" else _global_result
    return read(out, args, case, world_size, meshes)


def run_all(rank: int, world_size: int) -> dict[str, dict]:
    """Every case on this rank (one process group, one pair of meshes for all)."""
    torch.manual_seed(0)
    meshes = {kind: init_device_mesh("cpu", mesh_shape(kind, world_size)) for kind in ("line", "grid")}
    return {name: run_case(case, world_size, meshes) for name, case in CASES.items()}

