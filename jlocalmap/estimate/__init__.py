"""Estimates: a step's memory, FLOPs, collectives and time per device on a
cluster this machine does not have, read from the traced program, with
strategy regions choosing for that cluster. See docs/estimates.md.

Example:
    >>> import jlocalmap as jlm
    >>> jlm.Hardware.preset("h200").hbm_bandwidth
    4800000000000.0
"""

from jlocalmap.estimate.hardware import Hardware
from jlocalmap.estimate.program import estimate
from jlocalmap.estimate.report import Estimate

__all__ = ["estimate", "Estimate", "Hardware"]
