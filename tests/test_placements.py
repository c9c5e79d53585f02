import pickle

import pytest

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard


def test_equal_by_value_and_hashable():
    assert Shard(0) == Shard(0) and Shard(0) != Shard(1)
    assert Replicate() == Replicate() and Partial() == Partial("sum")
    assert Partial("avg") != Partial("sum") and Shard(0) != Replicate()
    assert len({Shard(0), Shard(0), Replicate(), Partial(), Partial("sum")}) == 3


def test_repr_like_dtensor():
    assert [repr(p) for p in (Shard(1), Replicate(), Partial(), Partial("max"))] == [
        "Shard(dim=1)", "Replicate()", "Partial(sum)", "Partial(max)"]


def test_predicates():
    assert Shard(2).is_shard() and Shard(2).is_shard(2) and not Shard(2).is_shard(0)
    assert not Replicate().is_shard() and Replicate().is_replicate()
    assert Partial("min").is_partial() and not Partial().is_replicate()
    assert not Shard(0).is_partial() and not Shard(0).is_replicate()


def test_immutable_and_picklable():
    with pytest.raises(AttributeError):
        Shard(0).dim = 1
    assert pickle.loads(pickle.dumps(Partial("avg"))) == Partial("avg")


@pytest.mark.parametrize("bad", ["0", 1.0, None, True])
def test_shard_dim_must_be_int(bad):
    with pytest.raises(jlm.PlacementTypeError, match=r"Shard\(dim\).*Shard\(0\)"):
        Shard(bad)


def test_unknown_reduce_op():
    with pytest.raises(jlm.PlacementValueError, match="Partial\\(reduce_op\\).*'mean'"):
        Partial("mean")
    assert issubclass(jlm.PlacementValueError, ValueError)
    assert issubclass(jlm.PlacementTypeError, TypeError)
