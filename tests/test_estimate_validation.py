"""Validation 1 of docs/estimates.md: jlm.estimate against XLA on this machine.

The transformer example's training step (every attention and overlap variant)
on 8 simulated CPU devices: the estimate's collectives per mesh axis (kind,
count, bytes per device) equal the compiled program's exactly, and its
per-device memory is within 15% of ``compiled.memory_analysis()`` (arguments +
outputs + temporaries). The count is the program's as issued: XLA's CPU
all-reduce combiner merges independent all-reduces of one group into one tuple
op (the same bytes), so the counts are compared with the program compiled
without that pass, the bytes with both."""

import collections
import sys
from pathlib import Path

import jax
import pytest

import jlocalmap as jlm
from jlocalmap.strategies.collective_axes import axes_of_line, instruction_lines

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import transformer  # noqa: E402

UNCOMBINED = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}
MEMORY_TOLERANCE = 0.15


def compiled_collectives(hlo_text: str, mesh) -> dict:
    """{(axes, kind): [runs, bytes]} of a compiled program, per device."""
    lines, found = instruction_lines(hlo_text), collections.defaultdict(lambda: [0, 0])
    for op in jlm.collectives_in_hlo(hlo_text).ops:
        axes, _ = axes_of_line(lines[op.name], tuple(mesh.devices.shape), mesh.axis_names)
        key = (",".join(axes) or "-", op.kind)  # "-": over axes of one device only
        found[key][0] += op.executions
        found[key][1] += op.bytes * op.executions
    return dict(found)


def estimated_collectives(est: jlm.Estimate) -> dict:
    return {(axes, kind): [v["count"], v["bytes"]]
            for axes, kinds in est.collectives().items() for kind, v in kinds.items()}


def transformer_step(variant: str, overlap: bool):
    cfg = transformer.Config()
    mesh = jax.make_mesh((2, 2, 2), ("dp", "cp", "tp"))
    ops = transformer.sharded_ops(mesh, cfg, variant, overlap)
    params, batch, _ = transformer.starting_point(mesh, cfg, seed=0)
    optimizer = transformer.make_optimizer(1e-2)
    with jax.set_mesh(mesh):
        opt_state = optimizer.init(params)
    step = transformer.make_train_step(ops, optimizer, cfg.head_dim)
    return mesh, step, (params, opt_state, *batch)


@pytest.mark.parametrize("variant,overlap", [("allgather", False), ("ring", False),
                                             ("allgather", True), ("ring", True)])
def test_transformer_collectives_and_memory_match_the_compiled_program(variant, overlap):
    mesh, step, args = transformer_step(variant, overlap)
    est = jlm.estimate(step, *args, hardware=jlm.Hardware.preset("cpu"))
    with jax.set_mesh(mesh):
        lowered = step.lower(*args)
        combined, issued = lowered.compile(), lowered.compile(compiler_options=UNCOMBINED)
    predicted = estimated_collectives(est)
    assert predicted == compiled_collectives(issued.as_text(), mesh)
    assert {k: b for k, (_, b) in predicted.items()} == \
        {k: b for k, (_, b) in compiled_collectives(combined.as_text(), mesh).items()}
    stats = combined.memory_analysis()
    measured = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                + stats.temp_size_in_bytes)
    assert est.memory.arguments == stats.argument_size_in_bytes
    assert abs(est.peak_bytes / measured - 1) <= MEMORY_TOLERANCE, (est.memory, stats)
