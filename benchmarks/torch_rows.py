"""PyTorch DTensor ``local_map`` rows of the harness, run in their own launch:
one process per device (torchrun), gloo on CPUs, NCCL on GPUs.

Rows (same sizes as the JAX rows; rank 0 times, every rank runs):

* ``mlp/torch-eager``: the TP MLP step, ``local_map`` eager, the body's
  all-reduce an autograd function whose backward is the identity (correct
  gradients);
* ``mlp/torch-eager(funcol)``: the same with ``funcol.all_reduce`` in the body
  as PyTorch documents it (its backward all-reduces again: weight gradients
  ``tp`` times too large, 2x at TP=2);
* ``mlp/torch.compile``: ``torch.compile`` of the first;
* ``eager/torch-eager``: the tiny ``all_reduce(x @ w)`` called eagerly;
* ``matmul/torch-local``: the step's five matmuls on each process's shards, no
  communication (torch's matmul rate at these shapes).

Each MLP variant's weight gradients are compared once with the unsharded
computation on rank 0 (``grad_check``: the ratio of norms, 1.0 when right).

The harness calls :func:`launch` (no torch import in its process); torchrun runs
this file's :func:`main`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any, Optional, Union

ROOT = pathlib.Path(__file__).resolve().parents[1]


def available() -> bool:
    """Whether torch with DTensor's local_map can be imported (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def launch(config: dict, nproc: int, timeout_s: float) -> Union[dict, str]:
    """Run the worker under torchrun with ``nproc`` processes; its JSON result, or
    the reason there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "torch_rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(pathlib.Path(__file__).resolve()),
               "--config", json.dumps(config), "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env=env, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            return f"torchrun did not finish within {timeout_s:.0f} s"
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        if not out.exists():
            return f"torchrun exited with {done.returncode}:\n{tail}"
        result = json.loads(out.read_text())
        if done.returncode != 0:  # gloo's threads can abort at exit, after the results
            result["exit"] = f"torchrun exited with {done.returncode} after writing the results"
        return result


# -- the worker (runs under torchrun) ------------------------------------------------------
def _setup(config: dict):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    cuda = config["device"] == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),),
                            mesh_dim_names=("tp",))
    return torch, dist, mesh, cuda


def _reductions(mesh):
    """The body's all-reduce two ways: torch's funcol (backward all-reduces
    again) and one whose backward is the identity (the correct one)."""
    import torch
    import torch.distributed._functional_collectives as funcol
    group = mesh.get_group()

    class AllReduceIdentityBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            # A functional all-reduce, whose result depends on x. The in-place
            # dist.all_reduce into a clone that was here is traced by torch.compile
            # (NCCL) as a value that does not depend on x: the compiled step's weight
            # gradients were zero (grad_check norm_ratio [0.0, 0.0] on an H200).
            return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))

        @staticmethod
        def backward(ctx, grad):
            return grad

    return {"identity": AllReduceIdentityBackward.apply,
            "funcol": lambda t: funcol.all_reduce(t, "sum", mesh)}


def _mlp(torch, mesh, reduce):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.experimental import local_map

    @local_map(out_placements=[Replicate()],
               in_placements=([Replicate()], [Shard(1)], [Shard(0)]), device_mesh=mesh)
    def mlp(x, w1, w2):
        return reduce(torch.nn.functional.gelu(x @ w1, approximate="tanh") @ w2)
    return mlp


def _wait(torch, cuda: bool, value: Any) -> Any:
    """Wait for a result: the local tensor of a DTensor, an async collective's
    completion, and the GPU stream."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor
    if isinstance(value, tuple):   # a step's gradients
        return tuple(_wait(torch, cuda, v) for v in value)
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, AsyncCollectiveTensor):
        value = value.wait()
    if cuda:
        torch.cuda.synchronize()
    return value


def _mlp_inputs(torch, mesh, config: dict, device: str):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    t, d, f = config["mlp"]
    dtype = getattr(torch, config["dtype"])
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
    host = {"x": randn(t, d), "w1": randn(d, f, scale=d ** -0.5),
            "w2": randn(f, d, scale=f ** -0.5),
            "dy": torch.randn(t, d, generator=gen).to(device)}
    x = distribute_tensor(host["x"], mesh, [Replicate()])
    w1 = distribute_tensor(host["w1"], mesh, [Shard(1)]).requires_grad_()
    w2 = distribute_tensor(host["w2"], mesh, [Shard(0)]).requires_grad_()
    return host, x, w1, w2


def _grad_scale(torch, host: dict, grads: tuple, rank: int) -> Optional[dict]:
    """The weight gradients of one timed step against the unsharded ones (rank 0's answer)."""
    got = [g.full_tensor().float() for g in grads]
    if rank != 0:
        return None
    ref_w = [host["w1"].float().clone().requires_grad_(), host["w2"].float().clone().requires_grad_()]
    h = torch.nn.functional.gelu(host["x"].float() @ ref_w[0], approximate="tanh")
    ((h @ ref_w[1]) * host["dy"]).sum().backward()
    scale = [float(g.norm() / r.grad.norm()) for g, r in zip(got, ref_w, strict=True)]
    err = [float((g - r.grad).abs().max() / r.grad.abs().max()) for g, r in zip(got, ref_w, strict=True)]
    return {"norm_ratio": scale, "max_rel_err": err}


def _rows(torch, dist, mesh, config: dict, cuda: bool, report: dict) -> dict:
    """name -> zero-argument call of one step (or tiny call)."""
    device = "cuda" if cuda else "cpu"
    rank = dist.get_rank()
    reduce = _reductions(mesh)
    host, x, w1, w2 = _mlp_inputs(torch, mesh, config, device)
    dy = host["dy"]

    def step(mlp):
        def run():  # timed to its gradients, which grad_check reads from this very call
            w1.grad = w2.grad = None
            (mlp(x, w1, w2).to_local().float() * dy).sum().backward()
            return w1.grad, w2.grad
        return run
    models = {"mlp/torch-eager": _mlp(torch, mesh, reduce["identity"]),
              "mlp/torch-eager(funcol)": _mlp(torch, mesh, reduce["funcol"])}
    if config.get("compile", True):
        models["mlp/torch.compile"] = torch.compile(_mlp(torch, mesh, reduce["identity"]))
    rows = {}
    for name, mlp in models.items():
        try:
            rows[name] = step(mlp)
            report["grad_check"][name] = _grad_scale(torch, host, rows[name](), rank)
        except Exception as error:  # noqa: BLE001 - a row that cannot run is reported
            report["errors"][name] = f"{type(error).__name__}: {error}"[:500]
    rows["matmul/torch-local"] = _local_matmuls(torch, x, w1, w2, dy)
    rows["eager/torch-eager"] = _tiny_call(torch, mesh, reduce["funcol"], device)
    return rows


def _local_matmuls(torch, x, w1, w2, dy):
    """The step's five matmuls on this process's shards, nothing else: torch's
    own matmul rate at these shapes (the JAX row matmul/local's twin)."""
    x, w1, w2 = (t.to_local().detach() for t in (x, w1, w2))
    dy = dy.to(x.dtype)

    def run():
        h = x @ w1
        dh = dy @ w2.T
        return h @ w2, h.T @ dy, x.T @ dh
    return run


def _tiny_call(torch, mesh, reduce, device: str):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import local_map
    n = mesh.size()
    gen = torch.Generator().manual_seed(1)
    x = distribute_tensor(torch.randn(64, 16 * n, generator=gen).to(device), mesh, [Shard(1)])
    w = distribute_tensor(torch.randn(16 * n, 32, generator=gen).to(device), mesh, [Shard(0)])
    f = local_map(lambda x, w: reduce(x @ w), out_placements=[Replicate()],
                  in_placements=([Shard(1)], [Shard(0)]), device_mesh=mesh)

    def run():
        with torch.no_grad():
            return f(x, w)
    return run


def _time_rows(torch, dist, rows: dict, config: dict, cuda: bool) -> dict:
    from benchmarks.timing import calibrate, time_calls
    block = lambda out: _wait(torch, cuda, out)  # noqa: E731
    times = {name: [] for name in rows}
    groups: dict = {}
    for name in rows:
        groups.setdefault(name.split("/")[0], []).append(name)
    for names in groups.values():
        calls = [_Call(rows[n]) for n in names]
        iters = calibrate(calls, block, config["round_s"])
        iters = int(_broadcast(torch, dist, iters, cuda))  # every rank the same count
        for r in range(config["rounds"]):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                dist.barrier()
                times[name].append(time_calls(rows[name], iters, block, not cuda))
    return times


class _Call:
    """What timing.calibrate expects of a row: a ``call`` attribute."""

    def __init__(self, call):
        self.call = call


def _broadcast(torch, dist, value: float, cuda: bool) -> float:
    t = torch.tensor([float(value)], device="cuda" if cuda else "cpu")
    dist.broadcast(t, 0)
    return float(t.item())


def main(argv: Optional[list] = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="PyTorch local_map rows (run by torchrun)")
    parser.add_argument("--config", required=True, help="JSON: device, dtype, mlp, rounds, "
                        "round_s, compile")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    sys.path.insert(0, str(ROOT))
    torch, dist, mesh, cuda = _setup(config)
    report = {"torch": torch.__version__, "backend": dist.get_backend(),
              "world": dist.get_world_size(), "threads": torch.get_num_threads(),
              "grad_check": {}, "errors": {}, "rows": {}}
    rows = _rows(torch, dist, mesh, config, cuda, report)
    times = _time_rows(torch, dist, rows, config, cuda)
    if dist.get_rank() == 0:
        report["rows"] = {name: {"times": t} for name, t in times.items()}
        pathlib.Path(args.out).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
