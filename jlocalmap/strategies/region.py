"""``strategy_region``: one region written several ways, run the cheapest way.

Each alternative is a ``local_map`` function with its own placements and
gradient declarations; all take the same global arguments and compute the same
global values. A call decides, once per signature (shapes, dtypes, current
placements; all static under ``jax.jit``), which alternative to run: the one
with the lowest predicted cost (``choose="cost"``: FLOPs, bytes and the
collectives of its compiled program, input moves included), or the fastest
measured on the devices (``choose="measure"``, cached in a JSON file). The
inputs are then moved to the chosen alternative's ``in_placements``.
See docs/strategies.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax

from jlocalmap._caches import LRU
from jlocalmap.errors import LocalMapTypeError, LocalMapValueError
from jlocalmap.strategies.alternatives import (
    Alternative,
    compiled,
    on_mesh,
    training_program,
)
from jlocalmap.strategies.choice import Choice, TableRow
from jlocalmap.strategies.cost_model import CostModel, estimate
from jlocalmap.strategies.measure import MeasureCache, agreed, mesh_key, time_programs
from jlocalmap.strategies.signature import Signature
from jlocalmap.strategies.target import Target, current
from jlocalmap.strategies.verify import verify as verify_alternatives

_CACHE_SIZE = 64  # signatures whose choice and program a strategy region keeps

CHOOSE = ("cost", "measure")


def _named(alternatives: Any) -> list[Alternative]:
    items = (list(alternatives.items()) if isinstance(alternatives, Mapping) else
             [(getattr(fn, "__name__", f"alternative{i}"), fn)
              for i, fn in enumerate(alternatives)])
    alts = [Alternative.of(name, fn, i) for i, (name, fn) in enumerate(items)]
    names = [a.name for a in alts]
    if len(alts) < 1 or len(set(names)) != len(names):
        raise LocalMapValueError(
            f"alternatives: expected one or more alternatives with distinct names, "
            f"found names {names}; pass a dict {{name: local_map function}}.")
    if any(a.mesh != alts[0].mesh for a in alts):
        raise LocalMapValueError(
            f"alternatives: expected every alternative on the same device_mesh, found "
            f"{[a.mesh for a in alts]}; build them all with device_mesh=mesh.")
    return alts


class StrategyRegion:
    """The callable :func:`strategy_region` returns: call it like one
    alternative; ``choice(*args)`` is the decision for those arguments'
    signature, ``describe(*args)`` prints it, ``alternative(name)`` runs one
    alternative by hand.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Replicate, Shard
        >>> mesh = jax.make_mesh((8,), ("dp",))
        >>> local = jlm.local_map(lambda x: 2 * x, [Shard(0)], ([Shard(0)],), device_mesh=mesh)
        >>> gathered = jlm.local_map(lambda x: 2 * x, [Replicate()], ([Replicate()],),
        ...                          device_mesh=mesh)
        >>> double = jlm.strategies.strategy_region({"local": local, "gathered": gathered})
        >>> x = jlm.distribute_tensor(np.arange(16.0), mesh, [Shard(0)])
        >>> double.choice(x).chosen, jlm.placements_of(double(x))
        ('local', (Shard(dim=0),))
        >>> print(double.describe(x).splitlines()[-1][:40])
        chosen: local (by cost: lowest predicted
        >>> float(jlm.full_tensor(double.alternative("gathered")(x))[3])
        6.0
    """

    def __init__(self, alternatives: Sequence[Alternative], choose: str, verify: bool,
                 cost_model: Optional[CostModel], out_placements: Any, train: bool,
                 cache_dir: Any, name: str):
        self.alternatives = tuple(alternatives)
        self.mesh = alternatives[0].mesh
        self.choose, self.verify, self.train = choose, verify, train
        self.cost_model = cost_model or (
            CostModel.for_devices(list(self.mesh.devices.flat))
            if isinstance(self.mesh, jax.sharding.Mesh) else CostModel.h200_nvlink())
        self.out_placements, self.name = out_placements, name
        self.cache = MeasureCache(cache_dir)
        self._choices: LRU = LRU(_CACHE_SIZE)
        self._jitted: LRU = LRU(_CACHE_SIZE)

    def __repr__(self) -> str:
        names = [a.name for a in self.alternatives]
        return f"strategy_region({self.name!r}, alternatives={names}, choose={self.choose!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise LocalMapTypeError(
                f"strategy region {self.name!r}: expected positional arguments only, found "
                f"keywords {sorted(kwargs)}; bind them with functools.partial on each "
                f"alternative's body.")
        sig = Signature.of(args, self.mesh)
        alt = self.alternative(self._choice(sig).chosen)
        if any(isinstance(x, jax.core.Tracer) for x in args):
            return alt(*args)
        program = self._jitted.get(sig)
        if program is None:
            program = self._jitted.put(sig, jax.jit(sig.over_arrays(alt)))
        with on_mesh(self.mesh):
            return program(*sig.arrays(args))

    def alternative(self, name: str) -> Callable:
        """One alternative on global values (its inputs moved to its placements,
        its outputs to the region's ``out_placements``): a hand-picked strategy."""
        for alt in self.alternatives:
            if alt.name == name:
                return alt.placed(self.out_placements)
        raise LocalMapValueError(
            f"name: expected one of {[a.name for a in self.alternatives]}, found {name!r}.")

    def choice(self, *args: Any) -> Choice:
        """The :class:`Choice` for the signature of ``args`` (decided on first use)."""
        return self._choice(Signature.of(args, self.mesh))

    def _choice(self, sig: Signature) -> Choice:
        target = current()
        if target is not None:
            return self._choice_for(target, sig)
        if not isinstance(self.mesh, jax.sharding.Mesh):
            raise LocalMapValueError(
                f"strategy region {self.name!r}: its alternatives are on an AbstractMesh, "
                f"which has no devices to run or measure on; estimate the program with "
                f"jlm.estimate(fn, *args, hardware=...), or build them on a jax.sharding.Mesh.")
        found = self._choices.get(sig)
        if found is None:
            for alt in self.alternatives:
                alt.check_arity(len(sig.args))
            if self.verify:
                verify_alternatives(self.alternatives, self.out_placements, sig, self.mesh)
            found = self._choices.put(sig, self._decide(sig))
        return found

    def _choice_for(self, target: Target, sig: Signature) -> Choice:
        """The choice for another machine: each alternative's traced program
        priced by ``target`` (nothing compiled or run here), reported to it."""
        found = self._choices.get((sig, target.key))
        if found is None:
            abstract = sig.arrays(sig.abstract(self.mesh))
            rows = tuple(TableRow(alt.name, target.price(sig.over_arrays(training_program(
                         alt.placed(self.out_placements), sig.differentiable, self.train)),
                         abstract)) for alt in self.alternatives)
            chosen = min(rows, key=lambda r: r.estimate.seconds).name
            found = self._choices.put((sig, target.key), Choice(
                chosen, "cost", str(sig), target.name, rows))
        target.choices.append((self.name, found))
        return found

    def describe(self, *args: Any) -> str:
        """The signature, the cost table, the chosen alternative and why."""
        return f"strategy region {self.name!r}\n{self.choice(*args)}"

    def _programs(self, sig: Signature) -> dict:
        """Each alternative's priced program, lowered and compiled."""
        abstract = sig.arrays(sig.abstract(self.mesh))
        return {alt.name: compiled(sig.over_arrays(training_program(
                    alt.placed(self.out_placements), sig.differentiable, self.train)),
                    abstract, self.mesh)
                for alt in self.alternatives}

    def _decide(self, sig: Signature) -> Choice:
        programs = self._programs(sig)
        estimates = {}
        for name, (lowered, program) in programs.items():
            estimates[name] = estimate(self.cost_model, lowered, program, self.mesh)
        measured = self._measured(sig, programs) if self.choose == "measure" else {}
        rows = tuple(TableRow(n, e, measured.get(n)) for n, e in estimates.items())
        chosen = min(estimates, key=lambda n: measured[n] if measured else estimates[n].seconds)
        if self.choose == "measure":   # timings differ by process: process 0 decides
            chosen = agreed(chosen, list(estimates))
        return Choice(chosen, self.choose, str(sig), self.cost_model.name, rows)

    def _measure_key(self, sig: Signature) -> str:
        names = ",".join(a.name for a in self.alternatives)
        return (f"{self.name} | {sig.key()} | {mesh_key(self.mesh)} | "
                f"{'train' if self.train else 'forward'} | {names}")

    def _measured(self, sig: Signature, programs: dict) -> dict:
        key = self._measure_key(sig)
        seconds = self.cache.get(key)
        if seconds is None or set(seconds) != set(programs):
            seconds = time_programs({n: c for n, (_, c) in programs.items()},
                                    sig.arrays(sig.random(self.mesh)))
            self.cache.put(key, seconds)
        return seconds


def strategy_region(alternatives: Any, *, choose: str = "cost", verify: bool = True,
                    cost_model: Optional[CostModel] = None, out_placements: Any = None,
                    train: bool = True, cache_dir: Any = None,
                    name: Optional[str] = None) -> StrategyRegion:
    """One region, several strategies: run whichever alternative is cheapest here.

    ``alternatives`` is a dict ``{name: local_map function}`` (or a list, named
    after the functions); each has ``device_mesh`` set (the same mesh for all)
    and one ``in_placements`` entry per positional argument, and all compute the
    same global values. A call moves its inputs from their current placements to
    the chosen alternative's (host arrays are taken as global values and placed),
    and its outputs to ``out_placements`` when given (else each alternative's
    own). The choice is made once per signature: ``choose="cost"`` ranks the
    alternatives by the :class:`CostModel` (``cost_model``; default the preset of
    the mesh's devices) on each one's compiled program, the training step
    (values and gradients) with ``train=True`` or the forward only;
    ``choose="measure"`` times the compiled programs and caches the seconds in
    ``cache_dir/strategies.json`` (default ``$JLOCALMAP_CACHE_DIR``, else
    ``~/.cache/jlocalmap``); in a multi-process job every process takes process
    0's choice. ``verify=True first checks, once per signature,
    that every alternative's values and gradients equal the first one's on a
    random input of that signature, and refuses one that differs by name.
    ``region.describe(*args)`` prints the cost table and the choice.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Replicate, Shard
        >>> mesh = jax.make_mesh((8,), ("tp",))
        >>> rows = jlm.local_map(lambda x, w: x @ w, [Shard(0)],
        ...                      ([Shard(0)], [Replicate()]), device_mesh=mesh)
        >>> cols = jlm.local_map(lambda x, w: x @ w, [Shard(1)],
        ...                      ([Replicate()], [Shard(1)]), device_mesh=mesh)
        >>> matmul = jlm.strategies.strategy_region({"rows": rows, "cols": cols},
        ...                              out_placements=[Replicate()])
        >>> x = jlm.distribute_tensor(np.ones((64, 8), np.float32), mesh, [Shard(0)])
        >>> w = jlm.distribute_tensor(np.ones((8, 64), np.float32), mesh, [Replicate()])
        >>> matmul.choice(x, w).chosen  # x is row-sharded already: rows moves less
        'rows'
        >>> float(matmul(x, w)[0, 0])
        8.0
    """
    if choose not in CHOOSE:
        raise LocalMapValueError(
            f"choose: expected one of {CHOOSE}, found {choose!r}; \"cost\" ranks by the "
            f"cost model, \"measure\" times each alternative once and caches the result.")
    if cost_model is not None and not isinstance(cost_model, CostModel):
        raise LocalMapTypeError(
            f"cost_model: expected a jlocalmap.strategies.CostModel, found {type(cost_model).__name__}; "
            f"use jlm.strategies.CostModel.cpu_simulated() or jlm.strategies.CostModel.h200_nvlink().")
    alts = _named(alternatives)
    return StrategyRegion(alts, choose, bool(verify), cost_model, out_placements,
                          bool(train), cache_dir, name or "+".join(a.name for a in alts))
