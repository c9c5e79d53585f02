"""Follow one input leaf through a local_map call: which of jlocalmap's modules
the call enters, in what order, how often it comes back to a module it left, and
how often a value's mesh or layout is read (``mesh_of`` / ``layout_of``).

The call: ``x`` distributed on a 1-D mesh of 4 devices, a local_map over a 2x2
mesh of the same devices (PyTorch's multi-mesh case: the leaf is re-expressed
on the local_map mesh, planned, laid out and handed to the body), first call.

    python benchmarks/leaf_walk.py            # the summary
    python benchmarks/leaf_walk.py --trace    # and the walk, one module stay a line
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jlocalmap as jlm  # noqa: E402

PACKAGE = os.path.dirname(jlm.__file__)
READERS = ("mesh_of", "layout_of")


# The stage of each module of the flat layout before the subpackages (the
# subpackages name their own stage), so that both layouts are walked alike.
FLAT = {"placements": "layouts", "specs": "layouts", "meshes": "layouts", "chunks": "layouts",
        "layout": "layouts", "uneven": "layouts", "value_layout": "layouts",
        "relayout": "movement", "distribute": "movement", "arguments": "call",
        "settings": "call", "other_mesh": "call", "plan": "call", "call": "call",
        "padding": "call", "region": "region", "outputs": "region", "gradients": "region",
        "region_names": "region", "region_record": "region", "region_inspection": "inspect",
        "region_residuals": "inspect", "layout_view": "inspect", "comm": "inspect",
        "collectives": "collectives", "groups": "collectives"}
# Value libraries every stage reads (not stages of the walk) and the base modules.
LIBRARIES = {"layouts", "errors", "_jax_compat", "_caches"}


def module_of(frame) -> str | None:
    """The jlocalmap module a frame runs in ('layouts/layout' say), or None."""
    path = frame.f_code.co_filename
    if not path.startswith(PACKAGE + os.sep):
        return None
    return os.path.relpath(path, PACKAGE)[:-3]


def stage_of(module: str) -> str:
    """The pipeline stage of a module: its subpackage, or its flat module's stage."""
    head = module.split(os.sep)[0]
    return FLAT.get(head, head)


def value_codes() -> set:
    """Code of every method and property of jlocalmap's values (its dataclasses):
    reading a value (``plan.operands``, ``layout.spec``, ``plan.key(...)``) is
    not entering the stage that made it."""
    import dataclasses
    import inspect as pyinspect
    codes = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("jlocalmap"):
            continue
        for _, cls in pyinspect.getmembers(module, dataclasses.is_dataclass):
            for attr in vars(cls).values():
                fn = getattr(attr, "fget", None) or getattr(attr, "func", None) or \
                    getattr(attr, "__func__", None) or attr
                if hasattr(fn, "__code__"):
                    codes |= nested_codes(fn.__code__)
    return codes


def nested_codes(code) -> set:
    """``code`` and the code of the comprehensions and functions inside it."""
    inner = [c for c in code.co_consts if hasattr(c, "co_consts")]
    return {code}.union(*map(nested_codes, inner))


def walk(fn, *args) -> tuple[list[str], dict[str, int]]:
    """The module stays of ``fn(*args)`` (consecutive frames in one module are one
    stay) and the number of calls of each value reader."""
    stays: list[str] = []
    skip = value_codes()
    reads = dict.fromkeys(READERS, 0)

    def profile(frame, event, _):
        if event not in ("call", "return"):
            return
        if event == "call" and frame.f_code.co_name in READERS and module_of(frame):
            reads[frame.f_code.co_name] += 1
        if frame.f_code in skip:
            return
        here = module_of(frame if event == "call" else frame.f_back) if frame else None
        if here and (not stays or stays[-1] != here):
            stays.append(here)
    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return stays, reads


def collapse(names: list[str]) -> list[str]:
    """Consecutive repeats as one."""
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


def summary(stays: list[str]) -> dict:
    """Modules entered and module stays; the walk over the pipeline's stages
    (the value libraries and the driver, local_map, which calls the stages in
    turn, left out) and its comebacks: stays in a stage left before."""
    stages = collapse([s for s in map(stage_of, stays) if s not in LIBRARIES | {"local_map"}])
    return {"modules": len(set(stays)), "module stays": len(stays),
            "stage walk": " > ".join(stages), "stage comebacks": len(stages) - len(set(stages))}


def walk_other_mesh_leaf() -> tuple[list[str], dict[str, int]]:
    """The walk of the documented call (an input on another mesh, first call)."""
    line = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    grid = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
    x = jlm.distribute_tensor(np.ones((8, 16), np.float32), line, [jlm.Shard(1)])
    f = jlm.local_map(lambda v: v * 2, [jlm.Shard(1), jlm.Shard(1)],
                      ([jlm.Shard(1), jlm.Shard(1)],), device_mesh=grid)
    return walk(f, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="print every module stay")
    args = parser.parse_args()
    stays, reads = walk_other_mesh_leaf()
    if args.trace:
        print("\n".join(stays))
    print(summary(stays) | reads)


if __name__ == "__main__":
    main()
