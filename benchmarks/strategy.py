"""The ``strategy`` workload: one MLP region written three ways (tensor
parallel, sequence parallel with collective matmuls, FSDP) as a
``jlocalmap.strategies.strategy_region``; its row is the training step of the alternative
the cost model chose, against the fastest of the three hand-picked, all timed
in the same rounds. Activations are sequence-sharded (``Shard(0)``) in and out,
weights stored column/row-sharded, as in examples/choose_strategy.py.

Example:
    >>> import jax
    >>> from benchmarks.strategy import strategy_workload
    >>> from benchmarks.workloads import MlpSize
    >>> work = strategy_workload(jax.devices(), MlpSize(64, 16, 64, "float32"))
    >>> sorted(row.name for row in work.rows)[:2]
    ['strategy/chosen', 'strategy/fsdp']
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Partial as Pa, Replicate as R, Shard as S, collectives as C

from benchmarks.timing import Row
from benchmarks.workloads import (MlpSize, Workload, gelu, grad_step, in_mesh, make_mesh, put,
                                  random)

CHOSEN = "strategy/chosen"


def alternatives(mesh) -> dict:
    """The three ways of the MLP ``gelu(x @ w1) @ w2`` over mesh axis ``tp``."""
    def tensor_parallel(x, w1, w2):
        return gelu(x @ w1) @ w2

    def seq_parallel_ring(x, w1, w2):
        return C.matmul_reduce_scatter(gelu(C.all_gather_matmul(x, w1, 0, "tp")), w2, 0, "tp")

    def fsdp(x, w1, w2):
        w1 = jax.lax.all_gather(w1, "tp", axis=1, tiled=True)
        return gelu(x @ w1) @ jax.lax.all_gather(w2, "tp", axis=0, tiled=True)

    sharded = ([S(0)], [S(1)], [S(0)])
    return {"tensor-parallel": jlm.local_map(
                tensor_parallel, [Pa()], ([R()], [S(1)], [S(0)]),
                in_grad_placements=([Pa()], [S(1)], [S(0)]), device_mesh=mesh),
            "seq-parallel-ring": jlm.local_map(seq_parallel_ring, [S(0)], sharded,
                                               device_mesh=mesh),
            "fsdp": jlm.local_map(fsdp, [S(0)], sharded, device_mesh=mesh)}


def strategy_workload(devices: Sequence[Any], size: MlpSize, seed: int = 0) -> Workload:
    """Rows ``strategy/<alternative>`` (hand-picked) and ``strategy/chosen``."""
    n = len(devices)
    mesh = make_mesh(devices, (n,), ("tp",))
    rng = np.random.default_rng(seed)
    t, d, f = size.tokens, size.d_model, size.d_ff
    w1 = put(mesh, random(rng, (d, f), size.dtype, d ** -0.5), P(None, "tp"))
    w2 = put(mesh, random(rng, (f, d), size.dtype, f ** -0.5), P("tp"))
    x = put(mesh, random(rng, (t, d), size.dtype), P("tp"))
    dy = put(mesh, random(rng, (t, d), "float32"), P("tp"))
    region = jlm.strategies.strategy_region(alternatives(mesh), out_placements=[S(0)], verify=False,
                                 name="benchmark-mlp")
    choice = region.choice(x, w1, w2)
    flops = 5 * 2 * t * d * f / n
    work = Workload(rows=[], info={"mesh": {"tp": n}, "size": dataclasses.asdict(size),
                                   "chosen": choice.chosen, "cost_table": str(choice)})
    for name in _timing_order([r.name for r in choice.rows], choice.chosen):
        step = grad_step(_forward(region, name))
        row = f"strategy/{name}"
        with jax.set_mesh(mesh):
            work.outputs[row] = step(w1, w2, x, dy)
        work.rows.append(Row(row, in_mesh(mesh, step, w1, w2, x, dy), flops=flops,
                             note=f"the cost model's choice: {choice.chosen}"
                             if name == "chosen" else "hand-picked alternative"))
    return work


def _forward(region, name: str):
    """The step's forward: the region choosing, or one alternative by hand."""
    call = region if name == "chosen" else region.alternative(name)
    return lambda w1, w2, x: call(x, w1, w2)


def _timing_order(names: list, chosen: str) -> list:
    """The hand-picked rows with ``chosen`` two places after its twin (cyclically:
    the rounds rotate the order). The chosen row runs the twin's program, and a
    row timed right after the same program finds it warm: adjacent, one of the
    two would gain from the other."""
    at = (names.index(chosen) + 2) % (len(names) + 1)
    return names[:at] + ["chosen"] + names[at:]


def pick_baseline(work: Workload) -> None:
    """After timing: the chosen row's baseline is the fastest hand-picked row."""
    hand = [row for row in work.rows if row.name != CHOSEN]
    best = min(hand, key=lambda row: statistics.median(row.times))
    for row in work.rows:
        if row.name == CHOSEN:
            row.baseline = best.name
    work.info["best_hand_picked"] = best.name
