"""decomp: tensor-decomposition compression for PyTorch CNNs.

import decomp
compressed = decomp.decompose(model, method="tucker", rank="vbmf", input_size=(3, 32, 32))
"""

from decomp import factorize
from decomp.batchnorm import calibrate
from decomp.checkpoint import load, save
from decomp.fuse import fuse
from decomp.metrics import competition_score, count_macs, count_params
from decomp.plan import LayerPlan, Plan, applied_plans, apply, decompose, plan
from decomp.tltorch import from_tltorch, to_tltorch

__version__ = "0.1.0"

__all__ = [
    "LayerPlan",
    "Plan",
    "__version__",
    "applied_plans",
    "apply",
    "calibrate",
    "competition_score",
    "count_macs",
    "count_params",
    "decompose",
    "factorize",
    "from_tltorch",
    "fuse",
    "load",
    "plan",
    "save",
    "to_tltorch",
]
