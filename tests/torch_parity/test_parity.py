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


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_parity(name, world_size):
    m = parity.measure(CASES[name], world_size)
    assert not parity.problems(m), f"{name} on {world_size} ranks: " + "; ".join(parity.problems(m))


def test_a_wrong_pytorch_gradient_is_a_problem():
    """The check can fail: jlocalmap's gradients in place of PyTorch's 4x ones."""
    m = parity.measure(CASES["matmul_replicate_out"], 4)
    m.grads_torch_jlm = 0.0
    assert parity.problems(m) == ["gradients differ by 0.00e+00, but PyTorch is documented wrong: "
                                  "update docs/parity.md"]
