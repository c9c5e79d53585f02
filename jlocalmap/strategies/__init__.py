"""Strategy regions: one region written several ways (several ``local_map``
alternatives), and the choice among them by a cost model or by measurement on
the mesh it runs on. See docs/strategies.md.

Example:
    >>> import jlocalmap as jlm
    >>> jlm.CostModel.cpu_simulated().name
    'cpu-simulated'
"""

from jlocalmap.strategies.cost_model import CostModel, Link
from jlocalmap.strategies.region import StrategyRegion, strategy_region

__all__ = ["strategy_region", "StrategyRegion", "CostModel", "Link"]
