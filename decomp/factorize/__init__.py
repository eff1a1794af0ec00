"""Factorizers: one layer in, a module of plain nn.Conv2d / nn.Linear out, and their registry.

``tucker2(conv, ranks=(r_out, r_in))``, ``cp(conv, rank)`` and ``svd(layer, rank)`` compute the
factors; ``build_*`` make the same modules with uninitialised weights, for loading saved models.
Each method file also registers a :class:`Method` (see :mod:`decomp.factorize.registry`), which
is what the plan, the budget, loading and the command line use.
"""

from decomp.factorize import registry
from decomp.factorize.base import Factorized
from decomp.factorize.cp import CPConv2d, CPDivergenceError, build_cp, cp, cp_factors
from decomp.factorize.cp_als import reporting_sweeps
from decomp.factorize.registry import Method, RankGrid, register
from decomp.factorize.svd import SVDConv2d, SVDLinear, build_svd, svd, svd_factors
from decomp.factorize.tucker import TuckerConv2d, build_tucker2, tucker2, tucker2_factors

__all__ = [
    "CPConv2d",
    "CPDivergenceError",
    "Factorized",
    "Method",
    "RankGrid",
    "SVDConv2d",
    "SVDLinear",
    "TuckerConv2d",
    "build_cp",
    "build_svd",
    "build_tucker2",
    "cp",
    "cp_factors",
    "register",
    "reporting_sweeps",
    "registry",
    "svd",
    "svd_factors",
    "tucker2",
    "tucker2_factors",
]
