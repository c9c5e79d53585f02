"""Strategy regions: one region written several ways (several ``local_map``
alternatives), and the choice among them by a cost model or by measurement on
the mesh it runs on. See docs/strategies.md.

Example:
    >>> import jlocalmap as jlm
    >>> jlm.strategies.CostModel.cpu_simulated().name
    'cpu-simulated'
"""

from jlocalmap.strategies.choice import Choice, TableRow
from jlocalmap.strategies.cost_model import CostEstimate, CostModel, Link
from jlocalmap.strategies.region import StrategyRegion, strategy_region

__all__ = ["strategy_region", "StrategyRegion", "Choice", "TableRow", "CostModel", "CostEstimate",
           "Link"]
