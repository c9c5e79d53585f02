"""Both sides of every case, measured against each other and against the
unsharded float64 result; the test module asserts on these figures, and
``table.py`` prints them.

``torch_results(ws)`` runs every case in ONE gloo world of ``ws`` processes
(about 6 s); ``jax_results(ws)`` runs them on the first ``ws`` JAX devices.
Both are computed once per process.

    m = measure(CASES["matmul_partial_out"], 4)   # spawns the world of 4 on first use
    problems(m)                                    # [] where the parity claim holds
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

import jax_side
from cases import CASES, Case, assemble, given_mesh, mesh_shape, placements, reference_grads, \
    reference_output


@functools.cache
def torch_results(world_size: int) -> list[dict]:
    """Per rank, per case, PyTorch's result (one spawned world for all cases)."""
    import torch_side
    from torch_world import run_world
    return run_world(torch_side.run_all, world_size)


@functools.cache
def jax_results(world_size: int) -> dict:
    """Per case, jlocalmap's result."""
    meshes = jax_side.meshes_for(world_size)
    return {name: jax_side.run_case(case, world_size, meshes) for name, case in CASES.items()}


@dataclass
class Measurement:
    """Max absolute differences (None where not applicable)."""
    case: Case
    world_size: int
    out_torch_jlm: float | None = None
    grads_torch_jlm: float | None = None
    jlm_ref: float | None = None            # out and grads, against the unsharded result
    torch_ref: float | None = None          # against what PyTorch is expected to give (see note)
    torch_note: str = ""
    refusals: tuple[str, str] | None = None  # (torch's error, jlocalmap's error)


def _maxdiff(a: list, b: list) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - y), initial=0.0)) for x, y in zip(a, b, strict=True))


def _grad_tokens(case: Case) -> list[tuple[str, ...]]:
    """Each array input's gradient placements: declared, else its entry, else its own."""
    none = (None,) * len(case.given)
    return [placements(declared or entry) or given_mesh(given)[1]
            for declared, entry, given in zip(case.in_grad or none, case.in_pl or none, case.given, strict=True)
            if given_mesh(given)[0] != "scalar"]


def _torch_uneven(case: Case, ranks: list[dict], ws: int, true_shape: tuple,
                  grad_shapes: list[tuple]) -> tuple[dict, str]:
    """Assemble the uneven case's local chunks; note the global shape PyTorch claims."""
    shape = mesh_shape(case.mesh, ws)
    tokens = placements(case.out_pl)
    out = assemble([r["local_out"] for r in ranks], shape, tokens)
    grads, whole = [], False
    for i, (t, global_shape) in enumerate(zip(_grad_tokens(case), grad_shapes, strict=True)):
        local = [r["local_grads"][i] for r in ranks]
        # torch 2.11 hands every rank the whole gradient of an uneven input (2.13 its chunk).
        if all(g.shape == global_shape for g in local) and any(s.startswith("S") for s in t):
            grads.append(local[0])
            whole = True
        else:
            grads.append(assemble(local, shape, t))
    local = ranks[0]["local_out"].shape
    split = [int(np.prod([n for n, t in zip(shape, tokens, strict=True) if t == f"S{d}"])) for d in range(len(local))]
    expected_claim = tuple(n * s for n, s in zip(local, split, strict=True))
    claimed = tuple(ranks[0]["claimed_shape"])
    note = f"claims global shape {claimed} for {true_shape}" if claimed == expected_claim else ""
    if whole:
        note += "; every rank's local gradient is the whole gradient (torch 2.11)"
    return {"out": out, "grads": grads}, note


def _torch_expected_grads(case: Case, ws: int, ref: list) -> tuple[list, str]:
    """What PyTorch gives where it is wrong (asserted), else the true gradients."""
    if case.torch_wrong == "tp_times":
        return [ws * g for g in ref], f"gradients = {ws} x the true ones"
    return ref, ""


def _summand(case: Case, ranks: list[dict]) -> tuple[list, str]:
    """The default-Replicate gradients: each rank holds its own summand. Returns the
    gradients with those inputs summed over ranks (rank 0's against jlocalmap's in
    ``grads_torch_jlm`` shows they are not the true ones)."""
    hit = [i for i, g in enumerate(case.given) if given_mesh(g)[1] == ("R",)]
    grads = [np.sum([r["grads"][i] for r in ranks], axis=0) if i in hit else g
             for i, g in enumerate(ranks[0]["grads"])]
    return grads, "the Replicate() input's gradient is each rank's own summand (their sum is the true one)"


def measure(case: Case, ws: int) -> Measurement:
    """One case at one world size, both sides."""
    ranks = [r[case.name] for r in torch_results(ws)]
    jlm = jax_results(ws)[case.name]
    m = Measurement(case, ws)
    if case.refusal:
        m.refusals = (ranks[0].get("error", ""), jlm.get("error", ""))
        if case.torch_wrong == "replicate_varies" and "out" in ranks[0]:   # the grid's rows disagree
            m.torch_ref = _maxdiff([ranks[0]["out"]], [ranks[-1]["out"]])
            m.torch_note = f"a Replicate() output differs by up to {m.torch_ref:.1f} between ranks"
        return m
    ref_out = reference_output(case, ws)
    ref = reference_grads(case, ws) if case.grads else []
    if case.torch_wrong == "uneven_shape":
        assembled, m.torch_note = _torch_uneven(case, ranks, ws, ref_out.shape,
                                                [np.shape(g) for g in ref])
        ranks = [assembled]
    m.out_torch_jlm = max(_maxdiff([r["out"]], [jlm["out"]]) for r in ranks)
    m.jlm_ref = _maxdiff([jlm["out"]] + jlm.get("grads", []), [ref_out] + ref)
    torch_ref = max(_maxdiff([r["out"]], [ref_out]) for r in ranks)
    if case.grads:
        m.grads_torch_jlm = max(_maxdiff(r["grads"], jlm["grads"]) for r in ranks)
        expected, note = _torch_expected_grads(case, ws, ref)
        if case.torch_wrong == "summand":
            summed, note = _summand(case, ranks)
            ranks = [{"grads": summed}]
        m.torch_note = m.torch_note or note
        torch_ref = max(torch_ref, max(_maxdiff(r["grads"], expected) for r in ranks))
    m.torch_ref = torch_ref
    return m


# Max absolute difference allowed between float32 results (values reach ~100 where
# PyTorch's gradients are 8x too large; float32 spacing there is ~1e-5).
TOL = 5e-5


def problems(m: Measurement) -> list[str]:
    """Every way the measurement breaks the parity claim (empty: it holds)."""
    case = m.case
    if m.refusals:
        found = [f"{side} does not refuse with {case.refusal!r}: {error[:300]!r}"
                 for side, error in zip(("PyTorch", "jlocalmap"), m.refusals, strict=True) if case.refusal not in error]
        if case.torch_wrong == "replicate_varies":      # PyTorch runs it, silently inconsistent
            found = [f for f in found if not f.startswith("PyTorch")]
            if not m.torch_ref or m.torch_ref <= 1e-2:
                found.append("PyTorch's ranks agree on the Replicate() output (or it refused)")
        return found
    found = []
    if m.out_torch_jlm > TOL:
        found.append(f"outputs differ by {m.out_torch_jlm:.2e}")
    if m.jlm_ref > TOL:
        found.append(f"jlocalmap is {m.jlm_ref:.2e} off the unsharded result")
    if m.torch_ref > TOL:
        found.append(f"PyTorch is {m.torch_ref:.2e} off {m.torch_note or 'the unsharded result'}")
    if bool(m.torch_note) != bool(case.torch_wrong):
        found.append(f"PyTorch is documented {case.torch_wrong!r} but gives {m.torch_note!r}")
    wrong_grads = case.torch_wrong in ("tp_times", "summand")
    if m.grads_torch_jlm is not None and wrong_grads != (m.grads_torch_jlm > 1.0):
        found.append(f"gradients differ by {m.grads_torch_jlm:.2e}, but PyTorch is documented "
                     + ("wrong: update docs/parity.md" if wrong_grads else "right"))
    return found
