"""The same programs give the same numbers in PyTorch DTensor's ``local_map``
(gloo CPU processes) and in jlocalmap (simulated JAX devices), at world sizes 4
and 8, and both are checked against the unsharded float64 result: outputs and
gradients, or, for the error cases, that both refuse. Where PyTorch is wrong,
its wrong value is asserted (tp times the true gradient; one rank's summand; a
wrong global shape), so a fix in PyTorch shows up here, next to jlocalmap's
right one. docs/parity.md explains each case; parity.problems lists the checks."""
import pytest

pytest.importorskip("torch", reason="the PyTorch parity tests need torch: pip install -e '.[parity]'")

import parity  # noqa: E402
from cases import CASES, WORLD_SIZES  # noqa: E402


# One test per world size: each builds one gloo world for all its cases, and under
# pytest-xdist the two land on different workers instead of each worker building both.
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parity(world_size):
    found = {name: parity.problems(parity.measure(case, world_size)) for name, case in CASES.items()}
    failing = [f"{name}: {'; '.join(p)}" for name, p in found.items() if p]
    assert not failing, f"{len(failing)} of {len(CASES)} cases on {world_size} ranks:\n" + "\n".join(failing)


def test_a_wrong_pytorch_gradient_that_turns_right_is_a_problem():
    """The check can fail: PyTorch documented 4x too large, but equal to jlocalmap's."""
    m = parity.Measurement(CASES["matmul_replicate_out"], 4, out_torch_jlm=0.0, grads_torch_jlm=0.0,
                           jlm_ref=0.0, torch_ref=0.0, torch_note="gradients = 4 x the true ones")
    assert parity.problems(m) == ["gradients differ by 0.00e+00, but PyTorch is documented wrong: "
                                  "update docs/parity.md"]


def test_a_refusal_that_does_not_happen_is_a_problem():
    m = parity.Measurement(CASES["redistribute_refused"], 4,
                           refusals=("ValueError: ... set redistribute_inputs=True ...", ""))
    assert parity.problems(m) == ["jlocalmap does not refuse with 'redistribute_inputs=True': ''"]
