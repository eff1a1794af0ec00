"""Rank selection for low-rank factorizations: EVBMF and a small spec language.

Pure numerics: takes singular values or matrices (numpy or torch), returns integers. It never
imports ``decomp``.
"""

from .strategies import (
    MIN_RANK,
    MIN_RANK_FRACTION,
    STRATEGIES,
    RankSpec,
    min_rank,
    parse_rank_spec,
    register,
)
from .vbmf import NOISE_Z, EVBMFResult, evbmf, evbmf_spectrum, noise_z_scores

__all__ = [
    "MIN_RANK",
    "MIN_RANK_FRACTION",
    "NOISE_Z",
    "STRATEGIES",
    "EVBMFResult",
    "RankSpec",
    "evbmf",
    "evbmf_spectrum",
    "min_rank",
    "noise_z_scores",
    "parse_rank_spec",
    "register",
]
