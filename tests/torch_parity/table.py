"""Print the parity table of docs/parity.md (markdown), measured now:

    python tests/torch_parity/table.py                  # world sizes 4 and 8
    python tests/torch_parity/table.py --world-sizes 4

Each row: max |PyTorch - jlocalmap| of the outputs and of the gradients, how far
jlocalmap and PyTorch are from the unsharded float64 result (PyTorch: from its
documented value where it is wrong), and what PyTorch gets wrong. Exits 1 if a
row breaks the parity claim (``parity.problems``).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":                       # a script: simulate the devices first
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import parity  # noqa: E402
from cases import CASES, WORLD_SIZES  # noqa: E402

HEADER = ("| case | world | out: torch vs jlm | grads: torch vs jlm | jlm vs unsharded "
          "| torch vs expected | PyTorch |\n| --- | --- | --- | --- | --- | --- | --- |")


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def row(m: parity.Measurement) -> str:
    """One markdown row for one case at one world size."""
    name = f"`{m.case.name}`"
    if m.torch_note and m.refusals:
        return f"| {name} | {m.world_size} | — | — | refuses: \"{m.case.refusal}\" | — | {m.torch_note} |"
    if m.refusals:
        kinds = " / ".join(e.split(":")[0] for e in m.refusals)
        return f"| {name} | {m.world_size} | — | — | — | — | both refuse ({kinds}): \"{m.case.refusal}\" |"
    cells = [m.out_torch_jlm, m.grads_torch_jlm, m.jlm_ref, m.torch_ref]
    return f"| {name} | {m.world_size} | " + " | ".join(map(_num, cells)) + f" | {m.torch_note or 'right'} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(WORLD_SIZES))
    args = parser.parse_args(argv)
    measured = [parity.measure(case, ws) for case in CASES.values() for ws in args.world_sizes]
    print(HEADER)
    print("\n".join(row(m) for m in measured))
    bad = [f"{m.case.name}@{m.world_size}" for m in measured if parity.problems(m)]
    print(f"\n{len(measured) - len(bad)} of {len(measured)} rows within {parity.TOL:g}"
          + (f"; failing: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
