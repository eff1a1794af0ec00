"""Rank selection for low-rank factorizations: EVBMF and a small spec language.

Pure numerics: takes singular values or matrices (numpy or torch), returns integers. It never
imports ``decomp``.
"""

from .strategies import STRATEGIES, RankSpec, parse_rank_spec, register
from .vbmf import EVBMFResult, evbmf, evbmf_spectrum

__all__ = [
    "STRATEGIES",
    "EVBMFResult",
    "RankSpec",
    "evbmf",
    "evbmf_spectrum",
    "parse_rank_spec",
    "register",
]
