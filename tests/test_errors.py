"""Every bad call to ``jlm.local_map`` gets a jlocalmap error (a ValueError or
TypeError subclass) whose message names the argument and the fix.

Each case is ``(build, error class, pattern)``: ``build(env)`` makes the bad call,
``pattern`` is searched (``re.DOTALL``) in the message. Errors raised while JAX
traces may carry JAX's appended "For simplicity, JAX has removed..." note; the
class must still be jlocalmap's."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from helpers import randn
from jlocalmap import Partial, Replicate, Shard

VE, TE = jlm.PlacementValueError, jlm.PlacementTypeError   # placement problems
LTE = jlm.LocalMapTypeError   # bad arguments that are not placements
S0, S1, R = Shard(0), Shard(1), Replicate()
L = jlm.local_map


class TorchShard:
    """Looks like a torch.distributed.tensor placement, but is not a jlocalmap one."""

    def __init__(self, dim):
        self.dim = dim

    def __repr__(self):
        return f"TorchShard({self.dim})"


@pytest.fixture(scope="module")
def env():
    rng = np.random.default_rng(0)
    m1 = jax.make_mesh((2,), ("tp",))
    m4 = jax.make_mesh((4,), ("tp",))
    m22 = jax.make_mesh((2, 2), ("dp", "tp"))
    auto = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)
    other_devices = jax.make_mesh((2,), ("tp",), devices=jax.devices()[2:4])
    other_names = jax.make_mesh((2,), ("dp",))
    X = randn(rng, 4, 8)
    return types.SimpleNamespace(
        m1=m1, m4=m4, m22=m22, auto=auto, X=X, rng=rng,
        x=jlm.distribute_tensor(X, m1, [S0]),                     # Shard(0) on ('tp',) of 2
        xr=jlm.distribute_tensor(X, m1, [R]),                     # Replicate()
        xp=jlm.distribute_tensor(X, m1, [Partial()]),             # Partial('sum')
        x22=jlm.distribute_tensor(X, m22, [S0, R]),               # on ('dp', 'tp')
        x4=jlm.distribute_tensor(X, m4, [S0]),                    # ('tp',) of 4
        x_devs=jlm.distribute_tensor(X, other_devices, [S0]),     # same names, other devices
        x_names=jlm.distribute_tensor(X, other_names, [S0]),      # axis 'dp'
        xa=jax.device_put(X, NamedSharding(auto, P("dp"))),       # Auto axes
    )


ident = lambda a: a          # noqa: E731
first = lambda a, b: a       # noqa: E731

COUNT_FIX = r"Give one entry \(a placement list or None\) per flattened"
LEN_FIX = r"give one Shard\(d\), Replicate\(\) or Partial\(\) per mesh axis"
TYPE_FIX = r"expected a list or tuple of jlocalmap placements \(Shard\(d\), Replicate\(\), Partial\(op\)\)"
RANGE_FIX = r"shard an existing dim or use Replicate\(\)"
MESH_FIX = (r"device_mesh: expected a jax\.sharding\.Mesh or AbstractMesh, found {}; build one "
            r"with jax\.make_mesh")
OTHER_MESH = (r"in_placements\[{0}\]: input {0} lives on .*but this local_map runs on .*move it "
              r"with jlocalmap\.distribute_tensor\(x, mesh, placements\) or set redistribute_inputs=True")
OTHER_MESH_TRACED = (r"in_placements\[{0}\]: input {0} lives on .*but this local_map runs on .*Under "
                     r"jax\.jit .* carries only its abstract mesh, not its devices.*move it before "
                     r"the trace with jlocalmap\.distribute_tensor\(x, mesh, placements\)")
MISMATCH = (r"in_placements\[{0}\]: input {0} has placements \[{1}\], but the local_map requires "
            r"\[{2}\]; set redistribute_inputs=True")
VARIES = (r"out_placements\[0\]: output 0 is declared Replicate\(\) on mesh axis '{0}', but its "
          r"value varies over '{0}'.*jax\.lax\.psum\(y, '{0}'\).*declare Partial\(\)")
EXPLICIT = (r"{}\[0\]: Partial\(\) on mesh axis 'tp' needs an Explicit axis.*"
            r"axis_types=\(AxisType\.Explicit")
NO_LAYOUT = (r"in_placements\[0\]: Partial\({}\) on mesh axis 'tp' has no JAX layout.*"
             r"redistribute to Replicate\(\)\) or use Partial\('sum'\)")
GRAD_FIT = (r"in_grad_placements\[0\]: gradient placement {0} on mesh axis 'tp' does not fit an "
            r"input placed {1}.*can only be {2}.*Fix the entry or leave it None")


CASES = [
    # -- in_placements / out_placements / in_grad_placements counts ---------------------
    pytest.param(lambda e: L(ident, [S0], ([S0], [S0]))(e.x), VE,
                 r"in_placements: Expecting 2 inputs to local_map function based on placements, "
                 r"but found 1\..*" + COUNT_FIX, id="in-count-2-for-1"),
    pytest.param(lambda e: L(first, [S0], ([S0],))(e.x, e.x), VE,
                 r"in_placements: Expecting 1 inputs .*but found 2\..*" + COUNT_FIX, id="in-count-1-for-2"),
    pytest.param(lambda e: L(first, [S0], ([S0], [S0], [S0]))(e.x, e.x), VE,
                 r"in_placements: Expecting 3 inputs .*but found 2\..*" + COUNT_FIX, id="in-count-3-for-2"),
    pytest.param(lambda e: L(ident, [S0], ())(e.x), VE,
                 r"in_placements: Expecting 0 inputs .*but found 1\..*" + COUNT_FIX, id="in-count-empty"),
    pytest.param(lambda e: L(lambda a: (a, a), [S0], ([S0],))(e.x), VE,
                 r"out_placements: Expecting 1 outputs to local_map function based on placements, "
                 r"but found 2\..*" + COUNT_FIX + r" output leaf", id="out-count-1-for-2"),
    pytest.param(lambda e: L(ident, ([S0], [S0]), ([S0],))(e.x), VE,
                 r"out_placements: Expecting 2 outputs .*but found 1\.", id="out-count-2-for-1"),
    pytest.param(lambda e: L(lambda a: (a, a, a), ([S0], [S0]), ([S0],))(e.x), VE,
                 r"out_placements: Expecting 2 outputs .*but found 3\.", id="out-count-2-for-3"),
    pytest.param(lambda e: jax.jit(L(lambda a: (a, a), [S0], ([S0],)))(e.x), VE,
                 r"out_placements: Expecting 1 outputs .*but found 2\.", id="out-count-under-jit"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), ([S0], [S0]))(e.x), VE,
                 r"in_grad_placements: Expecting 2 inputs .*but found 1\..*" + COUNT_FIX,
                 id="grad-count-2-for-1"),
    pytest.param(lambda e: L(first, [S0], ([S0], [S0]), ([S0], [S0], [S0]))(e.x, e.x), VE,
                 r"in_grad_placements: Expecting 3 inputs .*but found 2\.", id="grad-count-3-for-2"),
    # -- a placement list of the wrong length for the mesh ----------------------------
    pytest.param(lambda e: L(ident, [S0], ([S0, R],))(e.x), VE,
                 r"in_placements\[0\]: expected 1 placements, one per mesh axis \('tp',\), found 2.*"
                 + LEN_FIX, id="in-len-2-on-1d"),
    pytest.param(lambda e: L(ident, [S0, R], ([S0],))(e.x22), VE,
                 r"in_placements\[0\]: expected 2 placements, one per mesh axis \('dp', 'tp'\), "
                 r"found 1.*" + LEN_FIX, id="in-len-1-on-2d"),
    pytest.param(lambda e: L(ident, [S0, R], ([S0, R, R],))(e.x22), VE,
                 r"in_placements\[0\]: expected 2 placements.*found 3.*" + LEN_FIX, id="in-len-3-on-2d"),
    pytest.param(lambda e: L(first, [S0], ([S0], [S0, R]))(e.x, e.X), VE,
                 r"in_placements\[1\]: expected 1 placements.*found 2.*" + LEN_FIX, id="in-len-second-input"),
    pytest.param(lambda e: L(ident, [S0, R, R], ([S0, R],))(e.x22), VE,
                 r"out_placements\[0\]: expected 2 placements.*found 3.*" + LEN_FIX, id="out-len"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), ([S0, R],))(e.x), VE,
                 r"in_grad_placements\[0\]: expected 1 placements.*found 2.*" + LEN_FIX, id="grad-len"),
    # -- Shard dim out of range ---------------------------------------------------------
    pytest.param(lambda e: L(first, [S0], ([S0], [Shard(5)]))(e.x, e.X), VE,
                 r"in_placements\[1\]: Shard\(dim=5\) is out of range for a value of rank 2 "
                 r"\(valid dims are -2\.\.1\); " + RANGE_FIX, id="in-dim-range-host-input"),
    pytest.param(lambda e: L(ident, [S0], ([Shard(2)],), redistribute_inputs=True)(e.x), VE,
                 r"in_placements\[0\]: Shard\(dim=2\) is out of range.*" + RANGE_FIX,
                 id="in-dim-range-redistributed"),
    pytest.param(lambda e: L(ident, [S0], ([Shard(-3)],))(e.x), VE,
                 r"in_placements\[0\]: Shard\(dim=-3\) is out of range.*" + RANGE_FIX,
                 id="in-dim-range-distributed"),
    pytest.param(lambda e: L(ident, [Shard(2)], ([S0],))(e.x), VE,
                 r"out_placements\[0\]: Shard\(dim=2\) is out of range for a value of rank 2.*"
                 + RANGE_FIX, id="out-dim-range"),
    pytest.param(lambda e: L(ident, [Shard(-3)], ([S0],))(e.x), VE,
                 r"out_placements\[0\]: Shard\(dim=-3\) is out of range.*" + RANGE_FIX,
                 id="out-dim-range-negative"),
    # -- not placements at all ------------------------------------------------------------
    pytest.param(lambda e: L(ident, [S0], "Shard(0)")(e.x), TE,
                 r"in_placements\[0\]: " + TYPE_FIX + r".*found 'Shard\(0\)'; write e\.g\. \[Replicate\(\)\]",
                 id="in-string"),
    pytest.param(lambda e: L(ident, [S0], ("Shard(0)",))(e.x), TE,
                 r"in_placements\[0\]: " + TYPE_FIX + r".*found 'Shard\(0\)'", id="in-string-in-tuple"),
    pytest.param(lambda e: L(ident, [S0], 0)(e.x), TE,
                 r"in_placements\[0\]: " + TYPE_FIX + r".*found 0; write e\.g\.", id="in-int"),
    pytest.param(lambda e: L(ident, [S0], TorchShard(0))(e.x), TE,
                 r"in_placements\[0\]: " + TYPE_FIX + r".*found TorchShard\(0\)", id="in-torch-like"),
    pytest.param(lambda e: L(ident, "Shard(0)", ([S0],))(e.x), TE,
                 r"out_placements\[0\]: " + TYPE_FIX + r".*found 'Shard\(0\)'", id="out-string"),
    pytest.param(lambda e: L(ident, 1, ([S0],))(e.x), TE,
                 r"out_placements\[0\]: " + TYPE_FIX + r".*found 1", id="out-int"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), "Shard(0)")(e.x), TE,
                 r"in_grad_placements\[0\]: " + TYPE_FIX, id="grad-string"),
    pytest.param(lambda e: L(ident, [S0], ([TorchShard(0)],))(e.x), TE,
                 r"in_placements\[0\]\[0\]: " + TYPE_FIX + r".*TorchShard\(0\)", id="in-torch-like-in-list"),
    pytest.param(lambda e: L(ident, [S0], ([0],))(e.x), TE,
                 r"in_placements\[0\]\[0\]: " + TYPE_FIX, id="in-int-in-list"),
    pytest.param(lambda e: L(ident, [S0, R], ([S0, "R"],))(e.x22), TE,
                 r"in_placements\[0\]\[1\]: " + TYPE_FIX + r".*'R'", id="in-string-mixed-in-list"),
    pytest.param(lambda e: L(first, [S0], ([S0], [TorchShard(0)]))(e.x, e.x), TE,
                 r"in_placements\[1\]\[0\]: " + TYPE_FIX, id="in-torch-like-second-input"),
    pytest.param(lambda e: L(ident, [TorchShard(0)], ([S0],))(e.x), TE,
                 r"out_placements\[0\]: " + TYPE_FIX, id="out-torch-like-in-list"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), ([TorchShard(0)],))(e.x), TE,
                 r"in_grad_placements\[0\]\[0\]: " + TYPE_FIX, id="grad-torch-like-in-list"),
    pytest.param(lambda e: L(lambda d: d["a"], [S0], ({"b": [S0]},))({"a": e.x}), VE,
                 r"in_placements.*'b'.*'a'", id="in-dict-wrong-keys"),
    # -- placements for leaves that are not arrays ----------------------------------------
    pytest.param(lambda e: L(first, [S0], ([S0], [R]))(e.x, "tag"), VE,
                 r"in_placements\[1\]: input 1 is a str, not an array, so its entry must be None "
                 r"\(it is passed to func unchanged\); found \[Replicate\(\)\]", id="in-for-string-leaf"),
    pytest.param(lambda e: L(first, [S0], ([S0], [R]))(e.x, None), VE,
                 r"in_placements\[1\]: input 1 is a NoneType, not an array, so its entry must be None",
                 id="in-for-None-leaf"),
    pytest.param(lambda e: L(first, [S0], ([S0], None), (None, [R]))(e.x, "tag"), VE,
                 r"in_grad_placements\[1\]: input 1 is a str, which has no gradient; its entry "
                 r"must be None", id="grad-for-string-leaf"),
    # -- None placements for a distributed input ------------------------------------------
    pytest.param(lambda e: L(lambda a, b: a + b, [S0], ([S0], None))(e.x, e.x), VE,
                 r"in_placements\[1\]: input 1 is distributed on .*so local_map expects placements "
                 r"for it, found None; give its placement list, e\.g\. \[Replicate\(\)\]",
                 id="None-for-distributed-input"),
    pytest.param(lambda e: L(lambda a, b: a + b, [S0, R], (None, [S0, R]))(e.x22, e.x22), VE,
                 r"in_placements\[0\]: input 0 is distributed .*expects placements.*"
                 r"\[Replicate\(\), Replicate\(\)\]", id="None-for-distributed-input-2d"),
    # -- outputs ----------------------------------------------------------------------
    pytest.param(lambda e: L(ident, None, ([S0],))(e.x), VE,
                 r"out_placements\[0\]: output 0 is an array, so it needs placements to become a "
                 r"distributed value, found None; give e\.g\. \[Replicate\(\)\]", id="array-out-None"),
    pytest.param(lambda e: L(lambda a: (a, a), ([S0], None), ([S0],))(e.x), VE,
                 r"out_placements\[1\]: output 1 is an array, so it needs placements", id="array-out-None-second"),
    pytest.param(lambda e: jax.jit(L(ident, None, ([S0],)))(e.x), VE,
                 r"out_placements\[0\]: output 0 is an array, so it needs placements", id="array-out-None-jit"),
    pytest.param(lambda e: L(lambda a: True, [S0], ([S0],))(e.x), VE,
                 r"out_placements\[0\]: output 0 is a bool, not an array, so its entry must be None; "
                 r"found \[Shard\(dim=0\)\]", id="placements-for-bool-output"),
    pytest.param(lambda e: L(lambda a: (a, "tag"), ([S0], [R]), ([S0],))(e.x), VE,
                 r"out_placements\[1\]: output 1 is a str, not an array, so its entry must be None",
                 id="placements-for-string-output"),
    # -- func, device_mesh, redistribute_inputs ------------------------------------------
    pytest.param(lambda e: L(3, [S0], ([S0],)), LTE,
                 r"func: expected a callable to run on local shards, found int; pass a function, or "
                 r"call local_map without func to get a decorator", id="func-int"),
    pytest.param(lambda e: L("matmul", [S0], ([S0],)), LTE,
                 r"func: expected a callable .*found str", id="func-string"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), device_mesh="tp"), TE,
                 MESH_FIX.format("str"), id="mesh-string"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), device_mesh=[0, 1]), TE,
                 MESH_FIX.format("list"), id="mesh-list"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), device_mesh={"tp": 2}), TE,
                 MESH_FIX.format("dict"), id="mesh-dict"),
    pytest.param(lambda e: L(ident, [S0], ([R],), redistribute_inputs="no")(e.x), LTE,
                 r"redistribute_inputs: expected True or False, found 'no'", id="redistribute-inputs-string"),
    # -- inputs on another mesh --------------------------------------------------------
    pytest.param(lambda e: L(ident, [S0], ([S0],), device_mesh=e.m1)(e.x4), VE,
                 OTHER_MESH.format(0), id="other-mesh-size"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), device_mesh=e.m1)(e.x_devs), VE,
                 OTHER_MESH.format(0), id="other-mesh-devices"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), device_mesh=e.m1)(e.x_devs), VE,
                 r"in_placements\[0\]: .*devic", id="other-mesh-devices-message-says-devices"),
    pytest.param(lambda e: jax.jit(L(ident, [S0], ([S0],), device_mesh=e.m1))(e.x_names), VE,
                 OTHER_MESH_TRACED.format(0), id="other-mesh-under-jit"),
    # -- placements that differ from the input's --------------------------------------------
    pytest.param(lambda e: L(ident, [S0], ([R],))(e.x), VE,
                 MISMATCH.format(0, r"Shard\(dim=0\)", r"Replicate\(\)")
                 + r" to redistribute it, or call jlocalmap\.redistribute", id="mismatch"),
    pytest.param(lambda e: jax.jit(L(ident, [S1], ([S1],)))(e.x), VE,
                 MISMATCH.format(0, r"Shard\(dim=0\)", r"Shard\(dim=1\)"), id="mismatch-under-jit"),
    pytest.param(lambda e: L(first, [S0, R], ([S0, R], [R, S1]))(e.x22, e.x22), VE,
                 MISMATCH.format(1, r"Shard\(dim=0\), Replicate\(\)", r"Replicate\(\), Shard\(dim=1\)"),
                 id="mismatch-second-input-2d"),
    pytest.param(lambda e: L(ident, [R], ([R],))(e.xp), VE,
                 MISMATCH.format(0, r"Partial\(sum\)", r"Replicate\(\)"), id="mismatch-partial-input"),
    # -- Replicate() outputs that vary ---------------------------------------------------
    pytest.param(lambda e: L(lambda a: a.sum(0), [R], ([S0],))(e.x), VE, VARIES.format("tp"),
                 id="replicate-output-varies"),
    pytest.param(lambda e: L(lambda a: a.sum(0), [R, R], ([S0, R],))(e.x22), VE, VARIES.format("dp"),
                 id="replicate-output-varies-2d"),
    pytest.param(lambda e: jax.jit(L(lambda a: a * 2, [R], ([S0],)))(e.x), VE, VARIES.format("tp"),
                 id="replicate-output-varies-jit"),
    # -- Partial on Auto axes, Partial('max') inputs -------------------------------------
    pytest.param(lambda e: L(lambda a: a.sum(1), [S0, Partial()], ([S0, R],))(e.xa), VE,
                 EXPLICIT.format("out_placements"), id="partial-output-auto-mesh"),
    pytest.param(lambda e: L(ident, [S0, R], ([S0, Partial()],), redistribute_inputs=True)(e.xa), VE,
                 EXPLICIT.format("in_placements"), id="partial-input-auto-mesh"),
    pytest.param(lambda e: L(ident, [S0, R], ([S0, Partial()],), device_mesh=e.auto)(e.X), VE,
                 EXPLICIT.format("in_placements"), id="partial-host-input-auto-mesh"),
    pytest.param(lambda e: jax.jit(L(ident, [S0, R], None))(e.xa), VE,
                 r"in_placements\[0\]: input 0 is on Auto-axis mesh .*not track under jax\.jit; give "
                 r"in_placements explicitly", id="auto-mesh-None-under-jit"),
    pytest.param(lambda e: L(ident, [R], ([Partial("max")],), device_mesh=e.m1)(e.X), VE,
                 NO_LAYOUT.format("max"), id="partial-max-host-input"),
    pytest.param(lambda e: L(ident, [R], ([Partial("max")],), redistribute_inputs=True)(e.xr), VE,
                 NO_LAYOUT.format("max"), id="partial-max-input-redistributed"),
    pytest.param(lambda e: L(ident, [R], ([Partial("min")],), redistribute_inputs=True)(e.xr), VE,
                 NO_LAYOUT.format("min"), id="partial-min-input-redistributed"),
    pytest.param(lambda e: L(ident, [Partial()], ([Partial("max")],))(e.xp), VE,
                 NO_LAYOUT.format("max"), id="partial-max-input-on-partial-sum"),
    pytest.param(lambda e: L(ident, [R], ([Partial("max")],))(e.xr), VE,
                 NO_LAYOUT.format("max"), id="partial-max-input-no-redistribute"),
    # -- in_grad_placements that do not fit -------------------------------------------------
    pytest.param(lambda e: L(ident, [S0], ([S0],), ([S1],))(e.x), VE,
                 GRAD_FIT.format(r"Shard\(dim=1\)", r"Shard\(dim=0\)", r"Shard\(dim=0\)"),
                 id="grad-shard1-for-shard0"),
    pytest.param(lambda e: L(ident, [S0], ([S0],), ([R],))(e.x), VE,
                 GRAD_FIT.format(r"Replicate\(\)", r"Shard\(dim=0\)", r"Shard\(dim=0\)"),
                 id="grad-replicate-for-shard"),
    pytest.param(lambda e: L(ident, [R], ([R],), ([S0],))(e.xr), VE,
                 GRAD_FIT.format(r"Shard\(dim=0\)", r"Replicate\(\)", r"Replicate\(\) or Partial\(\)"),
                 id="grad-shard-for-replicate"),
    pytest.param(lambda e: L(ident, [R], ([R],), ([Partial("max")],))(e.xr), VE,
                 r"in_grad_placements\[0\]: Partial\(max\) on mesh axis 'tp' is not a gradient "
                 r"reduction \(gradients add up\); use Partial\('sum'\)", id="grad-partial-max"),
    pytest.param(lambda e: L(ident, [R], ([R],), ([Partial("min")],))(e.xr), VE,
                 r"in_grad_placements\[0\]: Partial\(min\) .*not a gradient reduction", id="grad-partial-min"),
    # -- placement constructors inside a local_map call ------------------------------------
    pytest.param(lambda e: L(ident, [Partial("mean")], ([S0],)), VE,
                 r"Partial\(reduce_op\): expected one of \('sum', 'avg', 'max', 'min'\), found "
                 r"'mean'; write e\.g\. Partial\('sum'\)", id="Partial-mean"),
    pytest.param(lambda e: L(ident, [S0], ([Shard("0")],)), TE,
                 r"Shard\(dim\): expected an int tensor dimension, found '0' of type str; write "
                 r"e\.g\. Shard\(0\)", id="Shard-string-dim"),
    pytest.param(lambda e: L(ident, [S0], ([Shard(1.0)],)), TE,
                 r"Shard\(dim\): expected an int .*found 1\.0 of type float", id="Shard-float-dim"),
    pytest.param(lambda e: L(ident, [jlm.Placement()], ([S0],))(e.x), TE,
                 r"Placement\(\): the base class has no meaning of its own; use Shard\(dim\), "
                 r"Replicate\(\) or Partial\(reduce_op\)",
                 id="bare-Placement-base-output"),
]


@pytest.mark.parametrize("build, cls, pattern", CASES)
def test_bad_local_map_call(env, build, cls, pattern):
    with pytest.raises(cls, match=f"(?s){pattern}") as excinfo:
        build(env)
    assert excinfo.type is cls, excinfo.type   # a placement error only for placement problems
    assert issubclass(excinfo.type, jlm.LocalMapError)
    assert issubclass(excinfo.type, (ValueError, TypeError))


def test_error_count_message_names_both_counts(env):
    with pytest.raises(VE) as excinfo:
        L(ident, [S0], ([S0], [S0], [S0], [S0]))(env.x)
    msg = str(excinfo.value)
    assert "Expecting 4 inputs" in msg and "but found 1" in msg


def test_errors_are_catchable_as_builtin_classes(env):
    with pytest.raises(ValueError):
        L(ident, [S0], ([R],))(env.x)
    with pytest.raises(TypeError):
        L(ident, [S0], ([S0],), device_mesh="tp")
    with pytest.raises(jlm.LocalMapError):
        L(ident, [S0], ([S0], [S0]))(env.x)


@pytest.mark.parametrize("build, cls, pattern", [
    (lambda e: jax.jit(L(ident, [S0], ([S0],), device_mesh=e.m1).lower)(e.X), jlm.LocalMapValueError,
     r"lower: expected concrete arguments"),
    (lambda e: jlm.strategies.Link(bandwidth=0.0, latency=0.0), jlm.LocalMapValueError, r"Link: expected bandwidth > 0"),
    (lambda e: jlm.collectives.all_reduce(e.X, "sum", e.m1), jlm.LocalMapValueError,
     r"no mesh axis is manual here"),
    (lambda e: jlm.collectives.all_reduce(e.X, "mean", "tp"), jlm.LocalMapValueError,
     r"reduce_op: expected one of"),
], ids=["lower-under-jit", "link-bandwidth", "collective-outside-body", "collective-reduce-op"])
def test_errors_that_are_not_about_placements_are_not_placement_errors(env, build, cls, pattern):
    """A bad argument that is not a placement (lower's arguments, a Link, a collective's
    reduce op or group) raises LocalMapValueError / LocalMapTypeError itself, not
    their Placement subclasses."""
    with pytest.raises(cls, match=pattern) as excinfo:
        build(env)
    assert excinfo.type is cls, excinfo.type
