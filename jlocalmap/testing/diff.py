"""The readable difference of two values: how many elements differ, the largest
absolute and relative errors and where they are, both values there, and a hint
when the two differ by one constant factor (the mark of a reduction done too
few or too many times: a gradient off by the mesh size).

Example:
    >>> import numpy as np
    >>> from jlocalmap.testing import describe_mismatch
    >>> print(describe_mismatch("grad of args[1]", np.full(3, 2.0), np.ones(3)))
    grad of args[1]: 3 of 3 elements differ (rtol=1e-05, atol=1e-05)
      max abs error 1 at index (0,): sharded 2, unsharded 1
      max rel error 1 at index (0,): sharded 2, unsharded 1
      sharded = 2 x unsharded at every nonzero element: a reduction done too few or too many times? (a gradient declared Replicate() that is Partial(), a psum counted twice)
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

_FACTOR_TOLERANCE = 1e-3


def describe_mismatch(name: str, actual: Any, expected: Any,
                      rtol: float = 1e-5, atol: float = 1e-5) -> Optional[str]:
    """``None`` where ``actual`` (the sharded run's value) is close to ``expected``
    (the unsharded one) elementwise, ``|actual - expected| <= atol + rtol *
    |expected|`` (NaN matching NaN), else the report of how they differ, headed by
    ``name``. Shapes must agree.

    Example:
        >>> import numpy as np
        >>> from jlocalmap.testing import describe_mismatch
        >>> describe_mismatch("output", np.ones((2, 2)), np.ones((2, 2))) is None
        True
        >>> print(describe_mismatch("output", np.ones(2), np.ones(3)))
        output: shape (2,), unsharded (3,)
    """
    a, b = np.asarray(actual), np.asarray(expected)
    if a.shape != b.shape:
        return f"{name}: shape {a.shape}, unsharded {b.shape}"
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    error = _errors(a64, b64)
    bad = error > atol + rtol * np.abs(np.nan_to_num(b64))
    if not bad.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(error == 0, 0.0, error / np.abs(np.nan_to_num(b64)))
    lines = [f"{name}: {int(bad.sum())} of {bad.size} elements differ (rtol={rtol:g}, atol={atol:g})",
             _worst("max abs error", error, a, b), _worst("max rel error", relative, a, b)]
    factor = _constant_factor(a64, b64, atol)
    if factor is not None:
        lines.append(f"sharded = {factor:.4g} x unsharded at every nonzero element{_why(factor)}")
    return "\n  ".join(lines)


def _errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b|, 0 where both are NaN (or the same infinity), inf where one is NaN."""
    with np.errstate(invalid="ignore"):
        error = np.abs(a - b)
    same = (np.isnan(a) & np.isnan(b)) | (a == b)
    return np.where(same, 0.0, np.where(np.isnan(error), np.inf, error))


def _worst(label: str, error: np.ndarray, a: np.ndarray, b: np.ndarray) -> str:
    at = np.unravel_index(int(np.argmax(error)), error.shape)
    return (f"{label} {error[at]:.4g} at index {tuple(int(i) for i in at)}: "
            f"sharded {a[at]:.6g}, unsharded {b[at]:.6g}")


def _why(factor: float) -> str:
    """A factor n or 1/n (n >= 2 an integer) is the mark of a reduction done too
    many or too few times."""
    n = max(factor, 1 / factor)
    if n < 1.5 or abs(n - round(n)) > _FACTOR_TOLERANCE * n:
        return ""
    return (": a reduction done too few or too many times? (a gradient declared "
            "Replicate() that is Partial(), a psum counted twice)")


def _constant_factor(a: np.ndarray, b: np.ndarray, atol: float) -> Optional[float]:
    """The ratio a / b where it is one number at every element (two at least)
    that is not ~0, and a is ~0 where b is."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    big = np.abs(b) > max(atol, 1e-30)
    if big.sum() < 2 or np.abs(a[~big]).max(initial=0.0) > atol:
        return None
    ratios = a[big] / b[big]
    factor = float(np.median(ratios))
    if factor == 0.0 or np.max(np.abs(ratios / factor - 1.0)) > _FACTOR_TOLERANCE:
        return None
    return factor
