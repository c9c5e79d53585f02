"""jlocalmap.testing, the kit for users' own sharded code: assert_matches_unsharded
passes on correct programs and fails with a readable difference on wrong ones
(the gradient off by the mesh size among them), expect_collectives as a function
and a block, the fixtures, and --jlm-devices in a fresh pytest process."""

import functools
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
import jlocalmap.testing
from jlocalmap import Partial, Replicate, Shard
from jlocalmap.testing import (assert_matches_unsharded, describe_mismatch, expect_collectives,
                               simulate_cpu_devices)

ROOT = pathlib.Path(__file__).resolve().parents[1]
S0, S1, R = [Shard(0)], [Shard(1)], [Replicate()]


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def tanh_mm(x, w):
    return jnp.tanh(x @ w)


@pytest.fixture(scope="module")
def dp4():
    return jax.make_mesh((4,), ("dp",))


def data_parallel(mesh, **kwargs):
    return jlm.local_map(tanh_mm, S0, (S0, R), device_mesh=mesh, **kwargs)


# -- assert_matches_unsharded ---------------------------------------------------------
def test_a_correct_program_matches_in_values_and_gradients(mesh2x4, rng):
    """Megatron MLP over (dp, tp), parameters a dict: every output and gradient."""
    @jlm.local_map(out_placements=[Shard(0), Replicate()],
                   in_placements=([Shard(0), Replicate()], {"w1": [Replicate(), Shard(1)],
                                                             "w2": [Replicate(), Shard(0)]}),
                   device_mesh=mesh2x4)
    def mlp(x, p):
        return jax.lax.psum(jax.nn.relu(x @ p["w1"]) @ p["w2"], "tp")

    params = {"w1": randn(rng, 6, 16), "w2": randn(rng, 16, 6)}
    assert_matches_unsharded(mlp, lambda x, p: jax.nn.relu(x @ p["w1"]) @ p["w2"],
                             randn(rng, 8, 6), params, mesh=mesh2x4,
                             placements=([Shard(0), Replicate()],
                                         {"w1": [Replicate(), Shard(1)], "w2": [Replicate(), Shard(0)]}))


def test_a_gradient_off_by_the_mesh_size_fails_naming_the_argument(dp4, rng):
    """PyTorch's silent bug class: a replicated weight's gradient declared Replicate()
    where it is Partial(). Checked bodies refuse it; an unchecked body (check_vma=False)
    trusts it, and the sum over the 4 batch shards is divided back: 1/4 of the gradient.
    The values are right, so only the gradient comparison can see it."""
    wrong = data_parallel(dp4, in_grad_placements=(S0, R), check_vma=False)
    x, w = randn(rng, 8, 3), randn(rng, 3, 2)
    with pytest.raises(AssertionError) as err:
        assert_matches_unsharded(wrong, tanh_mm, x, w, mesh=dp4, placements=(S0, R))
    message = str(err.value)
    assert message.startswith("f_sharded (tanh_mm) does not match f_reference (tanh_mm, "
                              "unsharded on one device): 1 of 3 compared values differ")
    assert "grad of args[1]: 6 of 6 elements differ (rtol=1e-05, atol=1e-05)" in message
    assert "sharded = 0.25 x unsharded at every nonzero element: a reduction done too few" in message
    assert "output" not in message and "grad of args[0]" not in message
    assert_matches_unsharded(wrong, tanh_mm, x, w, mesh=dp4, placements=(S0, R), grads=False)
    assert_matches_unsharded(data_parallel(dp4), tanh_mm, x, w, mesh=dp4, placements=(S0, R))


def test_a_wrong_output_names_its_path_the_index_and_both_values(dp4, rng):
    """Device 1 adds 0.5 to its second row (global row 3), column 0."""
    x, w = randn(rng, 8, 3), randn(rng, 3, 2)
    bump = jnp.zeros((2, 2)).at[1, 0].set(0.5)
    one_bad_element = jlm.local_map(
        lambda x, w: {"y": x @ w + (jax.lax.axis_index("dp") == 1) * bump,
                      "n": jax.lax.psum(jnp.sum(x > 0), "dp")},
        {"y": S0, "n": R}, (S0, R), device_mesh=dp4)
    with pytest.raises(AssertionError) as err:
        assert_matches_unsharded(one_bad_element, lambda x, w: {"y": x @ w, "n": jnp.sum(x > 0)},
                                 x, w, mesh=dp4, placements=(S0, R), grads=False)
    lines = str(err.value).splitlines()
    assert lines[0].endswith("1 of 2 compared values differ") and len(lines) == 4
    assert lines[1] == "output['y']: 1 of 16 elements differ (rtol=1e-05, atol=1e-05)"
    worst = re.fullmatch(r"  max abs error 0.5 at index \(3, 0\): sharded (\S+), unsharded (\S+)", lines[2])
    assert worst, lines[2]
    sharded, unsharded = map(float, worst.groups())
    assert abs(unsharded - (x @ w)[3, 0]) < 1e-5 and abs(sharded - unsharded - 0.5) < 1e-5
    assert lines[3].startswith("  max rel error ") and "at index (3, 0)" in lines[3]


def test_shapes_structures_and_placements_errors(dp4, rng):
    x, w = randn(rng, 8, 3), randn(rng, 3, 2)
    ok = data_parallel(dp4)
    with pytest.raises(AssertionError, match=r"outputs differ in shape:\noutput: shape \(8, 2\), "
                                             r"unsharded \(4, 2\)"):
        assert_matches_unsharded(ok, lambda x, w: tanh_mm(x, w)[:4], x, w, mesh=dp4, placements=(S0, R))
    with pytest.raises(AssertionError, match=r"outputs differ in structure"):
        assert_matches_unsharded(ok, lambda x, w: (tanh_mm(x, w),), x, w, mesh=dp4, placements=(S0, R))
    with pytest.raises(jlm.PlacementValueError, match=r"placements: expected one entry per "
                                                      r"argument \(2\), found 1"):
        assert_matches_unsharded(ok, tanh_mm, x, w, mesh=dp4, placements=(S0,))
    with pytest.raises(jlm.LocalMapValueError, match=r"mesh: expected the mesh"):
        assert_matches_unsharded(ok, tanh_mm, x, w, placements=(S0, R))


def test_uneven_shards_partial_inputs_one_list_for_all_and_x64(dp4, rng):
    x, w = randn(rng, 8, 3), randn(rng, 3, 2)
    f = data_parallel(dp4)
    assert_matches_unsharded(f, tanh_mm, x[:5], w, mesh=dp4, placements=(S0, R))  # 2 + 2 + 1 + 0 rows
    total = jlm.local_map(lambda x: jax.lax.psum(x, "dp"), R, ([Partial()],), device_mesh=dp4)
    assert_matches_unsharded(total, lambda x: x, x, mesh=dp4, placements=[Partial()])
    assert_matches_unsharded(f, tanh_mm, x, w, mesh=dp4, placements=(S0, R), x64=True)
    ready = (jlm.distribute_tensor(x, dp4, S0), jlm.distribute_tensor(w, dp4, R))
    assert_matches_unsharded(f, tanh_mm, *ready, mesh=dp4)                         # laid out already


def test_describe_mismatch_nan_and_factors():
    assert describe_mismatch("o", np.array([1.0, np.nan]), np.array([1.0, np.nan])) is None
    text = describe_mismatch("o", np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0]))
    assert "1 of 3 elements differ" in text and "max abs error inf at index (1,): sharded nan" in text
    assert describe_mismatch("o", np.array([1.5, 3.0]), np.array([1.0, 2.0])).endswith(
        "sharded = 1.5 x unsharded at every nonzero element")          # no reduction hint for 1.5


# -- expect_collectives ------------------------------------------------------------
def tp_matmul(mesh):
    return jlm.local_map(lambda x, w: jax.lax.psum(x @ w, "tp"), R, (S1, S0), device_mesh=mesh)


def test_expect_collectives_function_passes_and_fails_with_both_tables(mesh4, rng):
    x, w = randn(rng, 8, 16), randn(rng, 16, 4)
    mm = tp_matmul(mesh4)
    comms = expect_collectives(mm, x, w, all_reduce=1)
    assert comms.bytes["all-reduce"] == 8 * 4 * 4
    expect_collectives(mm, x, w, all_reduce=None)
    with pytest.raises(AssertionError) as err:
        expect_collectives(mm, x, w, all_gather=None)
    lines = str(err.value).splitlines()
    assert lines[0] == ("expected collectives differ from the compiled program's "
                        "(<lambda>(float32[8,16], float32[16,4])):")
    assert lines[1].split() == ["kind", "expected", "found"]
    assert lines[2].split() == ["all-reduce", "0", "1", "<-", "differs"]
    assert lines[3].split() == ["all-gather", "any", "0"]
    assert lines[6].split() == ["collective-permute", "0", "0"]
    assert lines[8] == "<lambda>(float32[8,16], float32[16,4]):"
    assert lines[10].split() == ["all-reduce", "1", "128"]           # the program's own table
    with pytest.raises(jlm.LocalMapTypeError, match=r"all_reduce: expected a count"):
        expect_collectives(mm, x, w, all_reduce=-1)


def test_expect_collectives_block_adds_the_programs_it_is_shown(mesh4, rng):
    x, w = randn(rng, 8, 16), randn(rng, 16, 4)
    mm = tp_matmul(mesh4)
    with expect_collectives(all_reduce=2) as rec:
        y = rec.run(mm, x, w)
        rec.count(mm, x, w)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)
    assert len(rec.programs) == 2
    with pytest.raises(AssertionError, match=r"from the compiled programs' \(<lambda>.*, <lambda>"):
        with expect_collectives(all_reduce=1) as rec:
            rec.run(mm, x, w)
            rec.run(mm, x, w)
    with pytest.raises(AssertionError, match=r"no program was counted in the block"):
        with expect_collectives():
            mm(x, w)
    with pytest.raises(ZeroDivisionError):   # the block's own error, not a count check
        with expect_collectives(all_gather=5) as rec:
            rec.count(mm, x, w)
            raise ZeroDivisionError("the block's own error")


def test_expect_collectives_executed_counts_loop_iterations(mesh1):
    looped = jax.shard_map(lambda x: jax.lax.fori_loop(0, 3, lambda _, c: c + jax.lax.psum(c, "tp"), x),
                           mesh=mesh1, in_specs=jax.P("tp"), out_specs=jax.P("tp"))
    x = jax.device_put(np.arange(8, dtype=np.float32), jax.NamedSharding(mesh1, jax.P("tp")))
    expect_collectives(looped, x, all_reduce=1)
    expect_collectives(looped, x, all_reduce=3, executed=True)
    with pytest.raises(AssertionError, match=r"expected runs per call differ"):
        expect_collectives(functools.partial(looped), x, all_reduce=1, executed=True)


# -- the plugin: fixtures, marker, device count -------------------------------------
def test_mesh_fixture_spans_every_device_on_one_axis(mesh):
    assert dict(mesh.shape) == {"x": jax.device_count()} == {"x": 8}


@pytest.mark.jlm_mesh((2, 4), ("dp", "tp"))
def test_mesh_fixture_follows_the_marker(mesh):
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}


def test_make_mesh_fixture_and_its_errors(make_mesh):
    assert make_mesh((2, 2), ("dp", "tp")).devices.size == 4
    with pytest.raises(jlm.LocalMapValueError, match=r"shape: \(4, 4\) needs 16 devices, but JAX "
                                                      r"has 8; .*pytest --jlm-devices 16"):
        make_mesh((4, 4), ("dp", "tp"))
    with pytest.raises(jlm.LocalMapValueError, match=r"names: expected one axis name per dim"):
        make_mesh((2, 4), ("dp",))
    with pytest.raises(jlm.LocalMapTypeError, match=r"names: expected a tuple of axis names"):
        make_mesh((8,), "tp")


def test_simulate_cpu_devices_after_the_backend_started():
    assert jax.device_count() == 8                                    # started: the count is fixed
    assert simulate_cpu_devices(8) == 8
    with pytest.raises(RuntimeError, match=r"simulate_cpu_devices\(3\): JAX's backend already "
                                           r"started with 8 cpu devices"):
        simulate_cpu_devices(3)


def _pytest(tmp_path, files, *flags):
    """A fresh pytest process in tmp_path (no project conftest), with 8 devices in XLA_FLAGS."""
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "jlocalmap.testing", "-p",
                           "no:cacheprovider", *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_jlm_devices_sets_the_count_before_jax_starts(tmp_path):
    done = _pytest(tmp_path, {"test_four.py": """
        import jax, pytest

        def test_count(mesh, make_mesh):
            assert jax.device_count() == 4 and dict(mesh.shape) == {"x": 4}
            with pytest.raises(ValueError, match="needs 8 devices, but JAX has 4"):
                make_mesh((2, 4), ("dp", "tp"))
        """}, "--jlm-devices", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "jlocalmap.testing: 4 cpu devices" in done.stdout and "1 passed" in done.stdout


def test_jlm_devices_after_a_conftest_started_jax_is_a_usage_error(tmp_path):
    done = _pytest(tmp_path, {"conftest.py": "import jax\nDEVICES = jax.devices()\n",
                              "test_x.py": "def test_x():\n    pass\n"}, "--jlm-devices", "4")
    assert done.returncode == 4, done.stdout + done.stderr             # pytest's usage error
    assert ("--jlm-devices 4: simulate_cpu_devices(4): JAX's backend already started with 8 cpu "
            "devices" in done.stderr), done.stderr


@pytest.mark.parametrize("name", jlocalmap.testing.__all__)
def test_every_public_name_has_a_runnable_example(name):
    assert ">>>" in (getattr(jlocalmap.testing, name).__doc__ or ""), name
