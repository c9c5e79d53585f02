"""jlocalmap across two processes: one global 8-device mesh, 4 devices per process.

Run it as a user would run a multi-host job, on one machine:

    python examples/multiprocess.py              # launcher: starts both processes

The launcher picks a free port on 127.0.0.1 and starts two copies of this
script, each with ``--process-id``; each calls ``jax.distributed.initialize``
(CPU collectives over gloo), simulates 4 CPU devices, and builds the same
global ``(dp=2, tp=4)`` mesh, whose ``dp`` axis spans the two processes. Both
run the same program (SPMD), and each checks its results against numpy:

* ``distribute_tensor`` from host data (every process passes the same global value),
  and ``jax.make_array_from_process_local_data`` (each passes only its own rows);
* a ``local_map`` tensor-parallel matmul, forward and ``jax.grad`` under ``jax.jit``;
* a ``Partial()`` output redistributed to ``Shard`` (a reduce-scatter across processes);
* an uneven input (7 rows over dp=2), handled as a ``jlm.UnevenArray``;
* repeated eager calls (compiled once, then reused);
* ``strategy_region(choose="measure")``: each process's own timings disagree, and
  every process takes process 0's choice (processes choosing differently would hang);
* ``count_collectives`` and ``describe``.

A worker alone:  python examples/multiprocess.py --process-id 0 --coordinator 127.0.0.1:12345
The last line printed is ``max |sharded - unsharded| = ...``; exit status 1 when a
check exceeds 1e-5 or a process fails.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

TOL = 1e-5
NUM_PROCESSES = 2
LOCAL_DEVICES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, default=None,
                        help="run as this worker (default: launch all workers)")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=NUM_PROCESSES)
    parser.add_argument("--local-devices", type=int, default=LOCAL_DEVICES,
                        help="simulated CPU devices per process")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="launcher: seconds to wait for the workers")
    return parser.parse_args(argv)


# -- launcher -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The workers' environment: CPU devices set by --local-devices, not by an
    inherited XLA_FLAGS device count (pytest's conftest sets 8)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def launch(args) -> int:
    coordinator = f"127.0.0.1:{free_port()}"
    command = [sys.executable, os.path.abspath(__file__), "--coordinator", coordinator,
               "--num-processes", str(args.num_processes),
               "--local-devices", str(args.local_devices)]
    print(f"launching {args.num_processes} processes, coordinator {coordinator}")
    workers = [subprocess.Popen(command + ["--process-id", str(i)], env=worker_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(args.num_processes)]
    deadline = time.monotonic() + args.timeout
    outputs, codes = [], []
    for worker in workers:
        try:
            out, _ = worker.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            out, _ = worker.communicate()
            out += f"\nTIMEOUT after {args.timeout:.0f} s"
        outputs.append(out)
        codes.append(worker.returncode)
    return report(outputs, codes)


def report(outputs, codes) -> int:
    worst = 0.0
    for i, (out, code) in enumerate(zip(outputs, codes, strict=True)):
        print(f"---- process {i} (exit status {code}) ----")
        for line in out.splitlines():
            if line.startswith("[Gloo]"):   # gloo's connection log
                continue
            print(line)
            if line.startswith(f"[{i}] max |sharded - unsharded| = "):
                worst = max(worst, float(line.rsplit("=", 1)[1]))
    failed = any(codes) or worst > TOL
    print(f"max |sharded - unsharded| = {worst:.2e}" if not any(codes)
          else "max |sharded - unsharded| = nan (a process failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    _ARGS = parse_args()
    if _ARGS.process_id is None:
        sys.exit(launch(_ARGS))

# -- worker ---------------------------------------------------------------------
import jax  # noqa: E402  (the launcher above never imports jax)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlocalmap as jlm  # noqa: E402
from jlocalmap import Partial, Replicate, Shard  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def initialize(args):
    """Join the job. Must run before anything touches a JAX device."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # jax 0.10's default too
    jax.config.update("jax_num_cpu_devices", args.local_devices)      # CPU backend only
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def global_mesh():
    """(dp, tp) over every process's devices; dp spans the processes."""
    n_proc, n_local = jax.process_count(), jax.local_device_count()
    mesh = jax.make_mesh((n_proc, n_local), ("dp", "tp"))
    rows = [{d.process_index for d in row} for row in mesh.devices]
    assert rows == [{p} for p in range(n_proc)], f"dp should span the processes: {rows}"
    return mesh


class Checker:
    """Prints each check's difference from numpy, prefixed with the process index."""

    def __init__(self):
        self.worst = 0.0
        self.prefix = f"[{jax.process_index()}]"

    def __call__(self, name, got, want):
        diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want))))
        self.worst = max(self.worst, diff)
        print(f"{self.prefix} {name:44s} max |diff| {diff:.1e}", flush=True)

    def say(self, text):
        for line in str(text).splitlines():
            print(f"{self.prefix} {line}", flush=True)


def host(x) -> np.ndarray:
    """The global value on this host: gathered to Replicate, then read locally
    (a process can read an array only through its own devices)."""
    return np.asarray(jlm.full_tensor(x))


def tp_layer(mesh):
    @jlm.local_map(out_placements=[Shard(0), Replicate()],
                   in_placements=([Shard(0), Shard(1)], [Replicate(), Shard(0)]),
                   device_mesh=mesh)
    def layer(x, w):  # local (b/dp, d/tp) @ (d/tp, k), summed over tp
        return jax.lax.psum(jnp.tanh(x) @ w, "tp")
    return layer


def check_forward_and_grad(mesh, check, X, W):
    x = jlm.distribute_tensor(X, mesh, [Shard(0), Shard(1)])
    w = jlm.distribute_tensor(W, mesh, [Replicate(), Shard(0)])
    layer = tp_layer(mesh)
    loss = lambda x, w: 0.5 * jnp.sum(layer(x, w) ** 2)  # noqa: E731
    with jax.set_mesh(mesh):
        y = jax.jit(layer)(x, w)
        gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
        comms = jlm.inspect.count_collectives(jax.grad(loss, argnums=(0, 1)), x, w)
    Y = np.tanh(X) @ W
    check("local_map forward under jit", host(y), Y)
    check("jax.grad under jit: d/dx", host(gx), (Y @ W.T) * (1 - np.tanh(X) ** 2))
    check("jax.grad under jit: d/dw", host(gw), np.tanh(X).T @ Y)
    assert jlm.placements_of(gw) == (Replicate(), Shard(0))
    check.say(f"gradient step collectives: {comms.counts['all-reduce']} all-reduce, "
              f"{comms.counts['all-gather']} all-gather")
    check.say(jlm.inspect.describe(y))
    return x, w


def check_partial_to_shard(mesh, check, x, w, X, W):
    partial = jlm.local_map(lambda x, w: jnp.tanh(x) @ w, [Shard(0), Partial()],
                            ([Shard(0), Shard(1)], [Replicate(), Shard(0)]), device_mesh=mesh)
    p = partial(x, w)
    s = jlm.redistribute(p, mesh, [Shard(0), Shard(1)])
    with jax.set_mesh(mesh):
        comms = jlm.inspect.count_collectives(lambda p: jlm.redistribute(p, mesh, [Shard(0), Shard(1)]), p)
    assert jlm.placements_of(s) == (Shard(0), Shard(1))
    check("Partial() output -> redistribute to Shard(1)", host(s), np.tanh(X) @ W)
    check.say(f"Partial -> Shard collectives: {comms.counts['reduce-scatter']} reduce-scatter, "
              f"{comms.counts['all-reduce']} all-reduce")


def check_process_local_data(mesh, check, w, X, W):
    """Host data, the other way: each process holds only its own rows (dp spans the
    processes) and JAX assembles the global array from the parts."""
    placements = [Shard(0), Shard(1)]
    rows = X.shape[0] // jax.process_count()
    mine = X[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    sharding = jax.NamedSharding(mesh, jlm.placements_to_spec(placements, mesh, X.ndim))
    x = jax.make_array_from_process_local_data(sharding, mine, X.shape)
    assert jlm.placements_of(x) == tuple(placements)
    check("process-local rows -> one global input", host(tp_layer(mesh)(x, w)), np.tanh(X) @ W)


def check_uneven(mesh, check, rng):
    U = rng.standard_normal((7, 8)).astype(np.float32)          # 7 rows over dp=2: 4 + 3
    u = jlm.distribute_tensor(U, mesh, [Shard(0), Replicate()])
    scale = jlm.local_map(lambda u: 2.0 * u + 1.0, [Shard(0), Replicate()],
                          ([Shard(0), Replicate()],), device_mesh=mesh)
    v = scale(u)
    assert isinstance(v, jlm.UnevenArray) and v.shape == (7, 8)
    check("uneven input (7 rows over dp=2)", np.asarray(jlm.full_tensor(v)), 2.0 * U + 1.0)


def check_eager_calls(mesh, check, rng, w, W, calls=3):
    layer = tp_layer(mesh)
    times = []
    for i in range(calls):
        X = rng.standard_normal((8, 16)).astype(np.float32)     # same draws in every process
        start = time.perf_counter()
        y = layer(X, w)                                          # host value: laid out by placements
        jax.block_until_ready(y)
        times.append(time.perf_counter() - start)
        check(f"eager call {i + 1}", host(y), np.tanh(X) @ W)
    check.say("eager call times: " + ", ".join(f"{t * 1e3:.1f} ms" for t in times)
              + " (the first compiles)")


def check_measured_choice(mesh, check, x, w):
    """Each process measures its own devices; here their cached timings are made to
    disagree (process 0: rows faster, process 1: cols), and both take process 0's."""
    rows = jlm.local_map(lambda x, w: x @ w, [Shard(0), Replicate()],
                         ([Shard(0), Replicate()], [Replicate(), Replicate()]), device_mesh=mesh)
    cols = jlm.local_map(lambda x, w: x @ w, [Replicate(), Shard(1)],
                         ([Replicate(), Replicate()], [Replicate(), Shard(1)]), device_mesh=mesh)
    region = jlm.strategies.strategy_region({"rows": rows, "cols": cols}, choose="measure", verify=False,
                                 cache_dir=tempfile.mkdtemp(), out_placements=[Replicate()] * 2)
    region.choice(x, w)                                   # measured, cached in this process
    [key] = json.loads(region.cache.path.read_text())
    faster = "rows" if jax.process_index() == 0 else "cols"
    region.cache.put(key, {"rows": 1.0, "cols": 2.0} if faster == "rows" else
                     {"rows": 2.0, "cols": 1.0})
    jlm.clear_caches()                                    # forget the choice: decide again
    check.say(f"measured strategy: own timings favour {faster}, "
              f"chosen {region.choice(x, w).chosen}")
    check("measured strategy region", host(region(x, w)), host(x) @ host(w))


def worker(args) -> int:
    initialize(args)
    check = Checker()
    mesh = global_mesh()
    check.say(f"process {jax.process_index()} of {jax.process_count()}: "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
              f"mesh {dict(mesh.shape)}")
    rng = np.random.default_rng(0)          # the same seed: the same global host data
    X = rng.standard_normal((8, 16)).astype(np.float32)
    W = rng.standard_normal((16, 4)).astype(np.float32)
    x, w = check_forward_and_grad(mesh, check, X, W)
    check_partial_to_shard(mesh, check, x, w, X, W)
    check_process_local_data(mesh, check, w, X, W)
    check_uneven(mesh, check, rng)
    check_eager_calls(mesh, check, rng, w, W)
    check_measured_choice(mesh, check, x, w)
    check.say(f"max |sharded - unsharded| = {check.worst:.2e}")
    return 1 if check.worst > TOL else 0


if __name__ == "__main__":
    sys.exit(worker(_ARGS))
