"""The parity cases, free of any framework: both sides (``torch_side`` in gloo
processes, ``jax_side`` on simulated devices) read the same inputs, meshes and
placements from here, and both are compared with the unsharded float64 result.

Placements are written as text, one token per mesh dim: ``"S1"`` is Shard(1),
``"R"`` Replicate(), ``"P"`` Partial("sum"); ``"S0,S1"`` is a list for a 2-D mesh.
An input's ``given`` entry says how the caller holds it: ``"line:S1"`` a value
distributed on the 1-D mesh of all ranks, ``"grid:S0,S0"`` on the (2, ws/2)
mesh, ``"host"`` a plain array (PyTorch: this rank's local chunk, by the input's
entry; jlocalmap: the global array), ``"scalar"`` a Python float.

    >>> case = CASES["matmul_partial_out"]
    >>> [a.shape for a in case_inputs(case, 4)], placements("S0,R")
    ([(16, 8), (8, 12)], ('S0', 'R'))
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np


def _mm(x, w):
    return x @ w


def _mul(x, s):
    return x * s


def _mlp(x, w1, w2):
    return np.tanh(x @ w1) @ w2


def _equal(x, y):
    return np.asarray(np.array_equal(x, y))


# What each body computes, unsharded: the framework sides implement the local
# versions (``mm_allreduce`` all-reduces a partial product inside the body...).
REFERENCE: dict[str, Callable[..., np.ndarray]] = {
    "mm": _mm, "mm_allreduce": _mm, "mul": _mul,
    "mlp_allreduce": _mlp, "mlp_g": _mlp, "mlp_f_g": _mlp,
    "equal_allgather": _equal, "mm_allgather": _mm,
}


@dataclass(frozen=True)
class Case:
    """One program, as both frameworks run it."""
    name: str
    source: str                                  # the PyTorch test (or doc) it mirrors
    body: str                                    # a key of REFERENCE
    given: tuple[str, ...]                       # how each input is held (see the module doc)
    shapes: Callable[[int], tuple]               # world size -> one shape (or float) per input
    in_pl: tuple | None                          # one entry (text or None) per input, or None
    out_pl: str
    in_grad: tuple | None = None
    mesh: str = "line"                           # the local_map mesh: "line" or "grid"
    redistribute: bool = False
    grads: bool = True
    refusal: str | None = None                   # both must refuse with this phrase
    torch_wrong: str | None = None               # what PyTorch gets wrong (see parity.py)
    note: str = ""
    # PyTorch's out_placements where they differ from jlocalmap's ("none": None), and
    # whether PyTorch returns the global value itself (a bool, or the plain tensor a
    # call with no DTensor input returns) rather than a DTensor or a local chunk.
    torch_out_pl: str | None = None
    torch_plain: bool = False
    same_inputs: bool = False                    # every input the same array (X.equal(X))


def placements(text: str | None) -> tuple[str, ...] | None:
    """``"S0,R"`` -> ``("S0", "R")``; ``None`` stays None."""
    return None if text is None else tuple(text.split(","))


def given_mesh(given: str) -> tuple[str, tuple[str, ...] | None]:
    """``"grid:S0,S1"`` -> ``("grid", ("S0", "S1"))``; ``"host"`` -> ``("host", None)``."""
    kind, _, pl = given.partition(":")
    return kind, placements(pl or None)


def mesh_shape(kind: str, world_size: int) -> tuple[int, ...]:
    """The shape of the "line" or "grid" mesh of ``world_size`` ranks."""
    return (world_size,) if kind == "line" else (2, world_size // 2)


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def case_inputs(case: Case, world_size: int) -> list:
    """The global inputs (float32 arrays from a seed of the case's name; floats as they are)."""
    rng = np.random.default_rng(_seed(case.name, world_size))
    inputs = [s if isinstance(s, float) else rng.standard_normal(s).astype(np.float32)
              for s in case.shapes(world_size)]
    return [inputs[0]] * len(inputs) if case.same_inputs else inputs


def cotangent(case: Case, world_size: int) -> np.ndarray:
    """The output cotangent G: the loss is ``sum(full_output * G)`` on both sides."""
    out = reference_output(case, world_size)
    return np.random.default_rng(_seed(case.name, world_size, "G")).standard_normal(
        out.shape).astype(np.float32)


def reference_output(case: Case, world_size: int) -> np.ndarray:
    """The unsharded float64 output."""
    args = [a if isinstance(a, float) else a.astype(np.float64) for a in case_inputs(case, world_size)]
    return REFERENCE[case.body](*args)


def reference_grads(case: Case, world_size: int, h: float = 1e-5) -> list[np.ndarray]:
    """The unsharded float64 gradients of ``sum(output * G)`` for every array input,
    by central differences (independent of both frameworks' autodiff)."""
    args = [a if isinstance(a, float) else a.astype(np.float64) for a in case_inputs(case, world_size)]
    g = cotangent(case, world_size).astype(np.float64)
    f = REFERENCE[case.body]
    grads = []
    for i, a in enumerate(args):
        if isinstance(a, float):
            continue
        grad = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            shifted = [list(args), list(args)]
            for sign, row in zip((1, -1), shifted, strict=True):
                moved = a.copy()
                moved[idx] += sign * h
                row[i] = moved
            grad[idx] = (np.sum(f(*shifted[0]) * g) - np.sum(f(*shifted[1]) * g)) / (2 * h)
        grads.append(grad)
    return grads


def assemble(local: list[np.ndarray], shape: tuple[int, ...], tokens: tuple[str, ...]) -> np.ndarray:
    """The global value from every rank's local value (rank order = row-major mesh order),
    as DTensor lays it out: ``Shard(d)`` concatenates along d (the first mesh dim is the
    outer split), ``Replicate`` takes the first, ``Partial`` sums.

        >>> parts = [np.full((1, 2), r, float) for r in range(4)]
        >>> assemble(parts, (2, 2), ("S0", "P")).tolist()
        [[1.0, 1.0], [5.0, 5.0]]
    """
    if not shape:
        return local[0]
    step = len(local) // shape[0]
    blocks = [assemble(local[i * step:(i + 1) * step], shape[1:], tokens[1:]) for i in range(shape[0])]
    head = tokens[0]
    if head == "R":
        return blocks[0]
    if head == "P":
        return np.sum(blocks, axis=0)
    return np.concatenate(blocks, axis=int(head[1:]))


MM = lambda ws: ((16, 8), (8, 12))           # noqa: E731  X @ W, 16 x 8 @ 8 x 12
MLP = lambda ws: ((4, 8), (8, 16), (16, 8))  # noqa: E731  tanh(x @ w1) @ w2
DOC = "local_map docstring"
TESTS = "test_local_map.py"


def _cases() -> list[Case]:
    return [
        Case("matmul_replicate_out", f"{TESTS}: correctness; {DOC}", "mm_allreduce",
             ("line:S1", "line:S0"), MM, ("S1", "S0"), "R", torch_wrong="tp_times",
             note="funcol.all_reduce in the body: its backward all-reduces the gradient again"),
        Case("matmul_partial_out", "Partial output instead of the body's all-reduce", "mm",
             ("line:S1", "line:S0"), MM, ("S1", "S0"), "P"),
        Case("matmul_shard_out", f"{TESTS}: in_placements test 1", "mm",
             ("line:S0", "line:R"), MM, ("S0", "R"), "S0", torch_wrong="summand",
             note="W's gradient defaults to Replicate: each rank keeps its own summand"),
        Case("in_placements_none", f"{TESTS}: in_placements test 2", "mm",
             ("line:S0", "line:R"), MM, None, "S0", torch_wrong="summand",
             note="as matmul_shard_out"),
        Case("scalar_none_entry", f"{TESTS}: in_placements test 3", "mul",
             ("line:S0", "scalar"), lambda ws: ((16, 8), 2.0), ("S0", None), "S0"),
        Case("plain_tensors", f"{TESTS}: in_placements tests 4, 5", "mm",
             ("host", "host"), MM, ("S0", "R"), "S0", grads=False,
             note="PyTorch takes plain tensors as local chunks, jlocalmap as global values"),
        Case("out_placements_bool", f"{TESTS}: out_placements test 1 (X.equal(Y))",
             "equal_allgather", ("line:S0", "line:S0"), lambda ws: ((8, 8), (8, 8)), None, "R",
             grads=False, torch_out_pl="none", torch_plain=True,
             note="PyTorch returns a Python bool (.item()); jlocalmap a replicated bool array"),
        Case("out_placements_bool_equal", f"{TESTS}: out_placements test 1, with Y = X",
             "equal_allgather", ("line:S0", "line:S0"), lambda ws: ((8, 8), (8, 8)), None, "R",
             grads=False, torch_out_pl="none", torch_plain=True, same_inputs=True,
             note="as out_placements_bool"),
        Case("out_placements_plain", f"{TESTS}: out_placements test 2 (no DTensor input)",
             "mm_allgather", ("host", "host"), lambda ws: ((4 * ws, 4), (4, 4)), ("S0", "R"), "R",
             grads=False, torch_out_pl="S0", torch_plain=True,
             note="PyTorch runs the body as a plain function on each rank's chunk; jlocalmap "
                  "lays the global value out (device_mesh given) and gathers it alike"),
        Case("expects_placements", f"{TESTS}: in_placements test 6", "mm",
             ("line:S0", "line:R"), MM, ("S0", None), "S0", refusal="expects placements"),
        Case("redistribute_inputs", f"{TESTS}: redistribute test 1", "mm_allreduce",
             ("line:S0", "line:S1"), MM, ("S1", "S0"), "R", redistribute=True,
             torch_wrong="tp_times", note="as matmul_replicate_out"),
        Case("redistribute_refused", f"{TESTS}: redistribute test 2", "mm_allreduce",
             ("line:S0", "line:S1"), MM, ("S1", "S0"), "R", refusal="redistribute_inputs=True"),
        Case("grad_placements", f"{TESTS}: with_grad_placement, matched", "mm",
             ("line:S0", "line:R"), MM, ("S0", "R"), "S0", in_grad=("S0", "P"), redistribute=True),
        Case("grad_placements_redistributed", f"{TESTS}: with_grad_placement, mismatched", "mm",
             ("line:R", "line:R"), MM, ("S0", "R"), "S0", in_grad=("S0", "P"), redistribute=True),
        Case("multi_mesh", f"{TESTS}: multi_mesh_inputs (a true matmul)", "mm",
             ("line:S1", "grid:S0,S0"), lambda ws: ((8, 32), (32, 4)), ("S1", "S0,S0"), "P,P",
             mesh="grid", note="jlocalmap differentiates X moved onto the grid first"),
        Case("multi_mesh_verbatim", f"{TESTS}: multi_mesh_inputs, as written", "mm",
             ("line:S1", "grid:S0,S1"), lambda ws: ((8, 8 * ws), (16, 8)), ("S1", "S0,S1"), "R,S1",
             mesh="grid", grads=False, refusal="varies over", torch_wrong="replicate_varies",
             note="a Replicate() output whose ranks hold different products"),
        Case("uneven_rows", f"{TESTS}: uneven_sharding (2 ws + 1 rows)", "mm",
             ("line:S0", "line:R"), lambda ws: ((2 * ws + 1, 4), (4, 8)), ("S0", "R"), "S0",
             in_grad=("S0", "P"), torch_wrong="uneven_shape",
             note="local_map's from_local assumes even chunks: a wrong global shape"),
        Case("uneven_2d", f"{TESTS}: uneven_sharding_2d_mesh (9 x 5)", "mul",
             ("grid:S0,S1", "scalar"), lambda ws: ((9, 5), 2.0), ("S0,S1", None), "S0,S1",
             mesh="grid", torch_wrong="uneven_shape", note="as uneven_rows"),
        Case("mlp_documented", "Megatron MLP, all-reduce as the docstring writes it", "mlp_allreduce",
             ("line:R", "line:S1", "line:S0"), MLP, ("R", "S1", "S0"), "R", in_grad=("P", "S1", "S0"),
             torch_wrong="tp_times", note="as matmul_replicate_out, for every weight"),
        Case("mlp_identity_backward", "Megatron MLP, g: all-reduce forward, identity backward",
             "mlp_g", ("line:R", "line:S1", "line:S0"), MLP, ("R", "S1", "S0"), "R",
             in_grad=("P", "S1", "S0")),
        Case("mlp_megatron_f_g", "Megatron MLP, f on the input and g on the output", "mlp_f_g",
             ("line:R", "line:S1", "line:S0"), MLP, ("R", "S1", "S0"), "R"),
    ]


CASES: dict[str, Case] = {c.name: c for c in _cases()}
WORLD_SIZES = (4, 8)
