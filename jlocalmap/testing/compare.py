"""``assert_matches_unsharded``: a sharded function's values and gradients
against its unsharded reference, with a readable difference.

The sharded side runs on the arguments laid out on the mesh by ``placements``
(``jlm.distribute_tensor``), as a training step runs on distributed parameters
and data; the reference runs on their global values, on one device. Both are
jitted, under ``jax.default_matmul_precision("highest")``. Gradients are those
of one scalar, ``sum_i sum(output_i * c_i)`` over the floating outputs with
fixed random cotangents ``c_i`` (the same on both sides; random, so that no
reduction can hide behind a symmetric loss), taken with respect to every
floating array argument: on the sharded side with respect to the distributed
values, then read back with ``jlm.full_tensor``.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap import Replicate, Shard
    >>> from jlocalmap.testing import assert_matches_unsharded
    >>> mesh = jax.make_mesh((4,), ("tp",))
    >>> mm = jlm.local_map(lambda x, w: jax.lax.psum(x @ w, "tp"), [Replicate()],
    ...                    ([Shard(1)], [Shard(0)]), device_mesh=mesh)
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.standard_normal((8, 16), np.float32), rng.standard_normal((16, 4), np.float32)
    >>> compared = assert_matches_unsharded(mm, lambda x, w: x @ w, x, w, mesh=mesh,
    ...                                     placements=([Shard(1)], [Shard(0)]))
    >>> sorted(compared)
    ['grad of args[0]', 'grad of args[1]', 'output']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jlocalmap as jlm
from jlocalmap.testing.diff import describe_mismatch
from jlocalmap.testing.layout_args import is_uneven, lay_out

_ARRAYS = (jax.Array, np.ndarray, np.generic, jlm.UnevenArray)


def assert_matches_unsharded(f_sharded: Callable, f_reference: Callable, *args: Any,
                             mesh: Optional[Mesh] = None, placements: Any = None,
                             grads: bool = True, rtol: float = 1e-5, atol: float = 1e-5,
                             seed: int = 0, x64: bool = False) -> dict[str, np.ndarray]:
    """Assert that ``f_sharded`` on ``args`` laid out by ``placements`` on ``mesh``
    gives the outputs of ``f_reference`` on the global ``args`` on one device,
    and (``grads=True``) the same gradients with respect to every floating
    argument. ``args`` are global values (numpy or jax arrays, pytrees of them,
    other leaves passed as they are, or values distributed already);
    ``placements`` has one entry per argument, a placement list (for every array
    leaf of that argument), ``None`` (passed as it is) or a pytree of these, or
    is one placement list for all. ``x64=True`` runs the reference in float64.
    Raises ``AssertionError`` naming each output or gradient that differs
    (``output[1]``, ``grad of args[0]['w']``), with the largest absolute and
    relative errors, their index and both values there. Returns the unsharded
    values compared, by those names, for checks that they are not trivial.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Replicate, Shard
        >>> from jlocalmap.testing import assert_matches_unsharded
        >>> mesh = jax.make_mesh((4,), ("tp",))
        >>> partial_sums = jlm.local_map(lambda x, w: x @ w, [jlm.Partial()],
        ...                              ([Shard(1)], [Shard(0)]), device_mesh=mesh)
        >>> x, w = np.ones((2, 8), np.float32), np.ones((8, 3), np.float32)
        >>> _ = assert_matches_unsharded(partial_sums, lambda x, w: x @ w, x, w, mesh=mesh,
        ...                              placements=([Shard(1)], [Shard(0)]))
        >>> wrong = jlm.local_map(lambda x, w: x @ w, [Replicate()],   # a partial sum kept
        ...                       ([Shard(1)], [Shard(0)]), device_mesh=mesh, check_vma=False)
        >>> try:
        ...     assert_matches_unsharded(wrong, lambda x, w: x @ w, x, w, mesh=mesh,
        ...                              placements=([Shard(1)], [Shard(0)]), grads=False)
        ... except AssertionError as e:
        ...     print(str(e).splitlines()[1])
        output: 6 of 6 elements differ (rtol=1e-05, atol=1e-05)
    """
    sharded = _Side(f_sharded, lay_out(args, placements, mesh), mesh, x64=False)
    reference = _Side(f_reference, args, None, x64=x64)
    shapes = sharded.output_shapes(), reference.output_shapes()
    _check_same_shapes(*shapes)
    cotangents = _cotangents(shapes[1], seed) if grads else None
    (outputs, gradients), (ref_outputs, ref_gradients) = (
        sharded.evaluate(cotangents), reference.evaluate(cotangents))
    found = [describe_mismatch(name, got, want, rtol, atol)
             for (name, got), (_, want) in zip(outputs + gradients, ref_outputs + ref_gradients,
                                               strict=True)]
    problems = [p for p in found if p is not None]
    if problems:
        compared = len(outputs) + len(gradients)
        raise AssertionError(
            f"f_sharded ({_name(f_sharded)}) does not match f_reference ({_name(f_reference)}, "
            f"unsharded on one device): {len(problems)} of {compared} compared values differ\n"
            + "\n".join(problems))
    return dict(ref_outputs + ref_gradients)


class _Side:
    """One side of the comparison: a function, its arguments, where it runs."""

    def __init__(self, f: Callable, args: tuple, mesh: Optional[Mesh], x64: bool):
        if not callable(f):
            raise jlm.LocalMapTypeError(
                f"f_sharded, f_reference: expected functions, found {type(f).__name__}.")
        flat, self.tree = jax.tree_util.tree_flatten_with_path(args, is_leaf=is_uneven)
        self.f, self.mesh, self.x64 = f, mesh, x64
        self.paths = [path for path, _ in flat]
        self.leaves = [leaf for _, leaf in flat]
        self.wrt = [i for i, leaf in enumerate(self.leaves) if _is_floating(leaf)]

    @contextlib.contextmanager
    def _context(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(jax.default_matmul_precision("highest"))
            if self.mesh is not None:
                stack.enter_context(jax.set_mesh(self.mesh))
            if self.x64:
                stack.enter_context(jax.enable_x64(True))
            yield

    def _inputs(self) -> list:
        """The leaves as run: the reference's global values, on one device."""
        if self.mesh is not None:
            return list(self.leaves)
        device = jax.devices()[0]
        return [jax.device_put(_global(leaf, self.x64), device) if isinstance(leaf, _ARRAYS)
                else leaf for leaf in self.leaves]

    def _outputs(self, leaves: list, floats: list) -> Any:
        leaves = list(leaves)
        for i, value in zip(self.wrt, floats, strict=True):
            leaves[i] = value
        outputs = self.f(*jax.tree_util.tree_unflatten(self.tree, leaves))
        return jax.tree.map(jlm.full_tensor, outputs, is_leaf=is_uneven)

    def output_shapes(self) -> Any:
        """The global shapes and dtypes of the outputs (traced, nothing runs)."""
        with self._context():
            leaves = self._inputs()
            return jax.eval_shape(lambda floats: self._outputs(leaves, floats),
                                  [leaves[i] for i in self.wrt])

    def evaluate(self, cotangents: Optional[list]) -> tuple[list, list]:
        """(name, global value) of every output leaf, and of every gradient."""
        with self._context():
            leaves = self._inputs()
            floats = [leaves[i] for i in self.wrt]
            if cotangents is None or not floats:
                outputs, gradients = jax.jit(lambda f: self._outputs(leaves, f))(floats), []
            else:
                run = jax.jit(lambda f: self._value_and_grad(leaves, f, cotangents))
                outputs, gradients = run(floats)
        named = jax.tree_util.tree_flatten_with_path(outputs)[0]
        return ([(f"output{jax.tree_util.keystr(p)}", np.asarray(v)) for p, v in named],
                [(f"grad of args{jax.tree_util.keystr(self.paths[i])}", np.asarray(g))
                 for i, g in zip(self.wrt, gradients, strict=True)] if gradients else [])

    def _value_and_grad(self, leaves: list, floats: list, cotangents: list) -> tuple:
        def scalar(floats):
            outputs = self._outputs(leaves, floats)
            terms = [jnp.sum(o * jnp.asarray(c, o.dtype))
                     for o, c in zip(jax.tree.leaves(outputs), cotangents, strict=True) if c is not None]
            return sum(terms, jnp.zeros((), floats[0].dtype)), outputs
        (_, outputs), gradients = jax.value_and_grad(scalar, has_aux=True)(floats)
        return outputs, [jlm.full_tensor(g) for g in gradients]


def _global(leaf: Any, x64: bool) -> np.ndarray:
    value = np.asarray(jlm.full_tensor(leaf))
    return value.astype(np.float64) if x64 and np.issubdtype(value.dtype, np.floating) else value


def _is_floating(leaf: Any) -> bool:
    return isinstance(leaf, _ARRAYS) and jnp.issubdtype(leaf.dtype, jnp.floating)


def _cotangents(shapes: Any, seed: int) -> list:
    """A fixed random cotangent per floating output leaf (None for the others)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s.shape) if jnp.issubdtype(s.dtype, jnp.floating) else None
            for s in jax.tree.leaves(shapes)]


def _check_same_shapes(sharded: Any, reference: Any) -> None:
    found: Any = jax.tree.structure(sharded)   # jaxlib's PyTreeDef has no type stub
    if found != jax.tree.structure(reference):
        raise AssertionError(
            f"the outputs differ in structure: sharded {found}, "
            f"unsharded {jax.tree.structure(reference)}")
    named = jax.tree_util.tree_flatten_with_path(sharded)[0]
    wrong = [f"output{jax.tree_util.keystr(path)}: shape {s.shape}, unsharded {r.shape}"
             for (path, s), r in zip(named, jax.tree.leaves(reference), strict=True) if s.shape != r.shape]
    if wrong:
        raise AssertionError("the outputs differ in shape:\n" + "\n".join(wrong))


def _name(f: Callable) -> str:
    return getattr(f, "__name__", None) or type(f).__name__
