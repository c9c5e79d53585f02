"""Run a function on a real PyTorch process group: ``world_size`` CPU processes
joined by gloo, as PyTorch's own DTensor tests run (forked from a forkserver). Nothing here imports JAX, so
the spawned processes stay light.

    from torch_world import run_world
    run_world(my_module.rank_fn, 4, "arg")   # [result of rank 0, result of rank 1, ...]

``fn(rank, world_size, *args)`` must be a module-level function (the processes
are spawned, so they import it); what it returns must pickle (numpy arrays,
numbers, dicts). The group is initialised before ``fn`` runs and destroyed after.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)                 # the ranks share a 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:                    # reported to the parent, raised there
        result = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_world(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each rank its own process."""
    import multiprocessing
    import torch.multiprocessing as mp
    # The ranks fork from a server that imported torch and fn's module once: a world
    # starts in about 2 s instead of 12 (8 ranks each importing torch on 2 cores).
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed.tensor", fn.__module__])
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_worker, args=(world_size, free_port(), outdir, fn, args),
                           nprocs=world_size, join=True, start_method="forkserver")
        results = []
        for rank in range(world_size):
            with open(os.path.join(outdir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results.append(value)
    return results
