"""The target a strategy region chooses for while a program is estimated for
another machine (:func:`jlocalmap.estimate`): a pricing of traced programs on
that hardware and mesh, set for the duration of the estimate. Regions traced
meanwhile rank their alternatives with it (no compiling, no measuring here)
and report each choice to it.

Example:
    >>> from jlocalmap.strategies.target import Target, current, pricing_for
    >>> target = Target("h100-sxm on (dp=64, tp=8)", ("h100-sxm",), price=lambda fn, args: None)
    >>> with pricing_for(target):
    ...     current().name
    'h100-sxm on (dp=64, tp=8)'
    >>> current() is None
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

from jlocalmap.strategies.choice import Choice
from jlocalmap.strategies.cost_model import Estimate


@dataclasses.dataclass
class Target:
    """``name`` (printed in cost tables), ``key`` (hashable: a region keeps one
    choice per signature and key), ``price(fn, abstract_args) -> Estimate``,
    and the ``choices`` made for it: (region name, :class:`Choice`)."""
    name: str
    key: Any
    price: Callable[[Callable, Sequence[Any]], Estimate]
    choices: list[tuple[str, Choice]] = dataclasses.field(default_factory=list)


_TARGET: contextvars.ContextVar[Optional[Target]] = contextvars.ContextVar(
    "jlocalmap_strategy_target", default=None)


def current() -> Optional[Target]:
    """The target being estimated for, or None (choose for this machine)."""
    return _TARGET.get()


@contextlib.contextmanager
def pricing_for(target: Target) -> Iterator[Target]:
    """Strategy regions traced inside the block choose for ``target``."""
    token = _TARGET.set(target)
    try:
        yield target
    finally:
        _TARGET.reset(token)
