"""The function local_map returns (jlocalmap.local_map.LocalMapped): nesting keeps
each level's settings, methods bind, names and docs are copied (not state), a
region can be named, and the renamed public names still work, with a warning."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from helpers import assert_close, randn
from jlocalmap import Replicate, Shard


def test_nesting_keeps_each_levels_settings(mesh4, rng):
    X = randn(rng, 8, 3)
    inner = jlm.local_map(lambda x: x * 2, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    outer = jlm.local_map(inner, [Replicate()], ([Replicate()],), device_mesh=mesh4)
    assert outer.settings is not inner.settings
    assert outer.out_placements == [Replicate()] and inner.out_placements == [Shard(0)]
    assert outer.__wrapped__ is inner
    # Inside outer's body the values are local (whole, as outer replicates them):
    # inner runs its function as it is, and outer lays out the result.
    y = outer(jlm.distribute_tensor(X, mesh4, [Replicate()]))
    assert jlm.placements_of(y) == (Replicate(),)
    assert_close(y, X * 2)


def test_a_local_map_in_a_body_runs_on_the_local_values(mesh4, rng):
    X = randn(rng, 8, 3)
    seen = []

    def inner_body(x):
        seen.append(x.shape)
        return jnp.sin(x)
    inner = jlm.local_map(inner_body, [Replicate()], ([Replicate()],), device_mesh=mesh4)
    outer = jlm.local_map(lambda x: inner(x) + 1, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    y = outer(jlm.distribute_tensor(X, mesh4, [Shard(0)]))
    assert seen and all(s == (2, 3) for s in seen)   # outer's shards, not inner's layout
    assert_close(jlm.full_tensor(y), np.sin(X) + 1)


def test_methods_bind_through_the_descriptor_protocol(mesh4, rng):
    X = randn(rng, 8, 3)

    class Scale:
        def __init__(self, factor):
            self.factor = factor

        @jlm.local_map(out_placements=[Shard(0)], in_placements=(None, [Shard(0)]),
                       device_mesh=mesh4)
        def apply(self, x):
            """Scale the rows."""
            return x * self.factor

    assert isinstance(Scale.__dict__["apply"], jlm.LocalMapped)
    assert Scale.apply is Scale.__dict__["apply"]
    for factor in (2.0, 3.0):
        assert_close(jlm.full_tensor(Scale(factor).apply(X)), X * factor)
    assert Scale(1.0).apply.__doc__ == "Scale the rows."
    x = jlm.distribute_tensor(X, mesh4, [Shard(0)])
    assert_close(jax.jit(lambda x: Scale(4.0).apply(x))(x), X * 4)


def test_update_wrapper_copies_names_and_docs_not_state(mesh4):
    def body(x):
        """Doc of body."""
        return x
    body.tag = "state of body"
    f = jlm.local_map(body, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    assert (f.__name__, f.__qualname__, f.__doc__) == ("body", body.__qualname__, "Doc of body.")
    assert "tag" not in vars(f) and f.__wrapped__ is body
    assert f.name == "body"


def test_decorator_and_call_forms_return_the_public_type(mesh4):
    decorate = jlm.local_map(out_placements=[Shard(0)], in_placements=([Shard(0)],),
                             device_mesh=mesh4)
    assert isinstance(decorate(jnp.cos), jlm.LocalMapped)
    assert isinstance(jlm.local_map(jnp.cos, [Shard(0)], ([Shard(0)],)), jlm.LocalMapped)


# -- name= ---------------------------------------------------------------------
def test_name_names_the_region_in_hlo_regions_and_describe(mesh4, rng):
    f = jlm.local_map(lambda x: x * 2, [Shard(0)], ([Shard(0)],), device_mesh=mesh4,
                      name="double")
    x = jlm.distribute_tensor(randn(rng, 8), mesh4, [Shard(0)])
    assert "local_map[double](S(0) -> S(0))" in f.lower(x).as_text(debug_info=True)
    [r] = jlm.inspect.regions(f, x)
    assert (r.name, r.func_name) == ("local_map[double](S(0) -> S(0))", "double")
    assert jlm.inspect.describe(r).startswith("local_map[double](S(0) -> S(0)) on mesh (tp=4)")
    assert repr(f).startswith("local_map('double'")


def test_name_is_in_errors(mesh4, rng):
    x = jlm.distribute_tensor(randn(rng, 8, 2), mesh4, [Shard(0)])
    for name, shown in (("rowsum", "rowsum"), (None, "<lambda>")):
        # A varying output declared Replicate(): refused, naming the region.
        f = jlm.local_map(lambda x: x * 2, [Replicate()], ([Shard(0)],), device_mesh=mesh4,
                          name=name)
        with pytest.raises(jlm.PlacementValueError, match=rf"local_map\[{shown}\]"):
            f(x)
        with pytest.raises(jlm.PlacementValueError, match=rf"local_map\[{shown}\]"):
            jax.jit(f)(x)


@pytest.mark.parametrize("bad", ["", "a[b]", 3])
def test_a_bad_name_is_refused(bad):
    with pytest.raises(jlm.LocalMapTypeError, match="name: expected a non-empty str"):
        jlm.local_map(jnp.cos, [Shard(0)], ([Shard(0)],), name=bad)


# -- renamed public names ----------------------------------------------------------
@pytest.mark.parametrize("old, new", [("RegionCall", "RegionSettings"),
                                      ("Operand", "RegionArray")])
def test_renamed_names_warn_and_name_the_new_spelling(old, new):
    with pytest.warns(DeprecationWarning, match=rf"jlocalmap\.{old} is deprecated: use "
                                                rf"jlocalmap\.inspect\.{new}"):
        alias = getattr(jlm, old)
    assert alias is getattr(jlm.inspect, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(jlm.inspect, new)   # the new spelling does not warn
    with pytest.raises(AttributeError):
        jlm.NoSuchName  # noqa: B018


def test_region_settings_mesh_is_a_mesh_like_an_uneven_arrays(mesh4, rng):
    f = jlm.local_map(lambda x: x + 1, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    x = jlm.distribute_tensor(randn(rng, 7), mesh4, [Shard(0)])
    [r] = jlm.inspect.regions(f, x)
    assert r.mesh == mesh4 and f(x).mesh == mesh4
    assert dataclasses.fields(jlm.inspect.RegionSettings)[2].name == "mesh"
