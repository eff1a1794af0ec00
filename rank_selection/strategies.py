"""Rank strategies: a registry and the rank-spec mini-language.

Accepted specs (``R_full = min(shape)`` of the matrix whose spectrum is given):

- ``vbmf``: the EVBMF rank (noise-checked, see :mod:`rank_selection.vbmf`), raised to the floor
  :func:`min_rank`; 0 stays 0: EVBMF found nothing but noise, and the caller leaves the layer as
  it is;
- ``vbmf:WF`` with ``0 <= WF <= 1``: weakened EVBMF, ``ceil(R_full - WF * (R_full - R_vbmf))``,
  at least the floor (``vbmf:0`` keeps everything, ``vbmf:1`` is plain EVBMF raised to the
  floor);
- ``ratio:F`` with ``0 < F <= 1``: ``ceil(F * R_full)``;
- ``energy:E`` with ``0 < E <= 1``: the smallest ``r`` whose leading squared singular values hold
  at least ``E`` of the total;
- an integer ``N >= 1``: fixed, clamped to ``R_full`` (canonical text ``"N"``);
- a bare float in ``(0, 1]``: shorthand for ``ratio:F``.

Any registered strategy is also reachable as ``name`` or ``name:param`` (so ``fixed:12`` works too).

The floor. A spectrum alone cannot tell a trained layer whose weights happen to look like noise
from noise, and where EVB's split fails its noise-model check, the checked rank is where the rest
*stops looking different* from noise, weak evidence on few values: 5 of 16 for the 96x16 1x1
conv of a pretrained EfficientNet-Lite0's second block. So the vbmf strategies
never go below :func:`min_rank`: ``ceil(R_full / 8)`` (:data:`MIN_RANK_FRACTION`) where the split
is noise-like, and at least :data:`MIN_RANK` = 8 (MUSCO's floor) where it is not, at most
``R_full``. A guard against degenerate bottlenecks, not a tuned optimum. ``ratio``, ``energy`` and
fixed ranks are the user's explicit choice and are not floored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from .vbmf import as_spectrum, evbmf_spectrum

__all__ = [
    "ACCEPTED_FORMS",
    "MIN_RANK",
    "MIN_RANK_FRACTION",
    "STRATEGIES",
    "RankSpec",
    "min_rank",
    "parse_rank_spec",
    "register",
]

ACCEPTED_FORMS = (
    "vbmf, vbmf:WF (0<=WF<=1), ratio:F (0<F<=1), energy:E (0<E<=1), an integer >= 1, "
    "or a float in (0, 1]"
)
MIN_RANK_FRACTION = 0.125
"""The vbmf strategies keep at least this share of a mode (see :func:`min_rank`)."""
MIN_RANK = 8
"""...and at least this many components where EVB's split is not noise-like."""
_CEIL_SLACK = 1e-9  # so that e.g. 0.07 * 100 = 7.000000000000001 rounds up to 7, not 8
_ENERGY_SLACK = 1e-12  # rounding of a cumulative sum of squares

Param = float | int | None
Strategy = Callable[[np.ndarray, tuple[int, int], Any], int]
ParamCheck = Callable[[Any], Param]

STRATEGIES: dict[str, Strategy] = {}
_PARAM_CHECKS: dict[str, ParamCheck] = {}
SHAPE_ONLY = {"ratio", "fixed"}  # strategies that ignore the singular values


def register(name: str, check: ParamCheck | None = None) -> Callable[[Strategy], Strategy]:
    """Register a rank strategy under ``name``.

    Args:
        name: the strategy's name in specs (``name`` or ``name:param``).
        check: turns the raw parameter (text, number or None) into the stored one, raising
            ValueError with the rule when it is bad; default: no parameter allowed.

    Returns:
        A decorator for ``fn(s, shape, param) -> int`` where ``s`` has shape ``(H,)``, descending,
        and ``shape`` is the ``(rows, cols)`` of the matrix.
    """

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"rank strategy names are lower-case identifiers; got {name!r}")

    def decorator(fn: Strategy) -> Strategy:
        if name in STRATEGIES:
            raise ValueError(f"rank strategy {name!r} is already registered")
        STRATEGIES[name] = fn
        _PARAM_CHECKS[name] = check or _no_param
        return fn

    return decorator


def _ceil(x: float) -> int:
    """Ceiling that ignores floating-point noise just above an integer."""
    return math.ceil(x - _CEIL_SLACK * max(1.0, abs(x)))


def _as_float(raw: Any) -> float:
    """A finite float from text or a real number."""
    if isinstance(raw, bool) or not isinstance(raw, str | Real):
        raise ValueError(f"expected a number; got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number; got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number; got {raw!r}")
    return value


def _no_param(raw: Any) -> None:
    if raw is not None:
        raise ValueError("takes no parameter")
    return None


def _fraction(raw: Any) -> float:
    """A required fraction ``0 < F <= 1``."""
    if raw is None:
        raise ValueError("needs a parameter in (0, 1]")
    value = _as_float(raw)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"parameter must be in (0, 1]; got {raw!r}")
    return value


def _weakening(raw: Any) -> float | None:
    """An optional weakening factor ``0 <= WF <= 1``."""
    if raw is None:
        return None
    value = _as_float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"weakening factor must be in [0, 1]; got {raw!r}")
    return value


def _positive_int(raw: Any) -> int:
    """A required integer ``N >= 1``."""
    if isinstance(raw, bool) or not isinstance(raw, str | Integral):
        raise ValueError(f"expected an integer >= 1; got {raw!r}")
    if isinstance(raw, str) and not re.fullmatch(r"\s*\+?\d+\s*", raw):
        raise ValueError(f"expected an integer >= 1; got {raw!r}")
    value = int(raw)
    if value < 1:
        raise ValueError(f"rank must be >= 1; got {raw!r}")
    return value


def min_rank(
    shape: tuple[int, int], noise_like: bool = True, fraction: float = MIN_RANK_FRACTION
) -> int:
    """The floor of the vbmf strategies for a matrix of ``shape``.

    Args:
        shape: ``(rows, cols)`` of the matrix (a layer's weight, or one unfolding of it).
        noise_like: whether EVB's split passed its noise-model check
            (:attr:`rank_selection.EVBMFResult.noise_like`).
        fraction: share of ``R_full = min(shape)`` to keep at least, in ``(0, 1]``.

    Returns:
        ``min(R_full, max(1, ceil(fraction * R_full)))``, raised to :data:`MIN_RANK` when not
        ``noise_like``: 2 for 16 channels (8 if not noise-like), 8 for 64, 125 for 1000.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}")
    r_full = min(int(d) for d in shape)
    if r_full < 1:
        raise ValueError(f"shape must have positive sizes; got {tuple(shape)!r}")
    floor = max(1, _ceil(fraction * r_full))
    return min(r_full, floor if noise_like else max(floor, MIN_RANK))


@register("vbmf", _weakening)
def _vbmf(s: np.ndarray, shape: tuple[int, int], weakening: float | None) -> int:
    """EVBMF rank, optionally moved towards full rank by ``1 - weakening``, at least the floor
    (plain ``vbmf`` keeps 0, which means "only noise")."""
    result = evbmf_spectrum(s, shape)
    r_vbmf = result.checked_rank
    if weakening is None and r_vbmf == 0:
        return 0
    r_full = min(shape)
    weakened = r_vbmf if weakening is None else _ceil(r_full - weakening * (r_full - r_vbmf))
    return max(min_rank(shape, result.noise_like), weakened)


@register("ratio", _fraction)
def _ratio(s: np.ndarray, shape: tuple[int, int], fraction: float) -> int:
    """``ceil(fraction * R_full)``, at least 1."""
    return max(1, _ceil(fraction * min(shape)))


@register("energy", _fraction)
def _energy(s: np.ndarray, shape: tuple[int, int], energy: float) -> int:
    """Smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)``, at least 1."""
    power = s**2
    total = float(power.sum())
    if total == 0.0:
        return 1
    reached = np.cumsum(power) >= (energy - _ENERGY_SLACK) * total
    return int(np.argmax(reached)) + 1 if reached.any() else len(power)


@register("fixed", _positive_int)
def _fixed(s: np.ndarray, shape: tuple[int, int], rank: int) -> int:
    """A fixed rank, clamped to ``R_full``."""
    return min(rank, min(shape))


@dataclass(frozen=True)
class RankSpec:
    """A parsed rank spec: a registered strategy name and its (validated) parameter.

    ``str(spec)`` gives back the canonical spec text, which ``parse_rank_spec`` parses to an equal
    spec.
    """

    name: str
    param: Param = None

    @property
    def needs_spectrum(self) -> bool:
        """False for strategies that look only at the matrix's shape (ratio, fixed)."""
        return self.name not in SHAPE_ONLY

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(
                f"unknown rank strategy {self.name!r}; expected one of {sorted(STRATEGIES)}"
            )
        try:
            param = _PARAM_CHECKS[self.name](self.param)
        except ValueError as err:
            raise _SpecError(self._text(), f"{self.name}: {err}") from None
        object.__setattr__(self, "param", param)

    def _text(self) -> str:
        """Canonical text: ``name``, ``name:param``, or just ``N`` for a fixed rank."""
        if self.name == "fixed" and self.param is not None:
            return str(self.param)
        return self.name if self.param is None else f"{self.name}:{self.param}"

    def __str__(self) -> str:
        return self._text()

    def select(self, s: Any, shape: tuple[int, int]) -> int:
        """Pick a rank from the singular values of one matrix (or tensor unfolding).

        Args:
            s: shape ``(H,)`` with ``H <= min(shape)``, singular values in any order.
            shape: ``(rows, cols)`` of the matrix.

        Returns:
            A rank in ``[0, min(shape)]``; only plain ``vbmf`` can return 0, and its other
            ranks, like those of ``vbmf:WF``, are at least :func:`min_rank`.
        """
        values = as_spectrum(s)
        r_full = min(int(d) for d in shape)
        if values.size > r_full:
            raise ValueError(f"got {values.size} singular values for shape {tuple(shape)}")
        rank = int(STRATEGIES[self.name](values, (int(shape[0]), int(shape[1])), self.param))
        if not 0 <= rank <= r_full:
            raise ValueError(f"rank strategy {self}: rank {rank} outside [0, {r_full}]")
        return rank


class _SpecError(ValueError):
    """A spec that does not parse: names the text, says why, and lists the accepted forms."""

    def __init__(self, text: Any, reason: str = "") -> None:
        self.reason = reason
        kind, detail = ("bad", f": {reason}") if reason else ("unknown", "")
        super().__init__(f"{kind} rank spec {text!r}{detail}; expected one of: {ACCEPTED_FORMS}")


def _build(text: Any, name: str, param: Any = None) -> RankSpec:
    """``RankSpec(name, param)``, with errors that quote the user's ``text``."""
    try:
        return RankSpec(name, param)
    except _SpecError as err:
        raise _SpecError(text, err.reason) from None


def parse_rank_spec(text: str | int | float | RankSpec) -> RankSpec:
    """Parse a rank spec (see the module docstring for the accepted forms).

    Args:
        text: spec text such as ``"vbmf"``, ``"vbmf:0.6"``, ``"ratio:0.5"``, ``"energy:0.95"``,
            ``"12"``, ``"0.5"``; an int (fixed rank); a float in ``(0, 1]`` (ratio); or a RankSpec.

    Returns:
        The parsed spec; ``parse_rank_spec(str(spec)) == spec``.

    Raises:
        ValueError: naming the bad text and listing the accepted forms.
    """
    if isinstance(text, RankSpec):
        return text
    if isinstance(text, bool):
        raise _SpecError(text)
    if isinstance(text, Integral):
        return _build(text, "fixed", int(text))
    if isinstance(text, Real):
        return _build(text, "ratio", float(text))
    if not isinstance(text, str):
        raise _SpecError(text, f"expected str, int or float, got {type(text).__name__}")
    return _parse_text(text)


def _parse_text(text: str) -> RankSpec:
    """Parse ``name``, ``name:param``, an integer, or a bare float."""
    body = text.strip()
    name, sep, param = (part.strip() for part in body.partition(":"))
    if sep and name not in STRATEGIES:
        raise _SpecError(text, f"no strategy {name!r}; registered: {', '.join(sorted(STRATEGIES))}")
    if sep:
        return _build(text, name, param)
    if re.fullmatch(r"[+-]?\d+", body):
        return _build(text, "fixed", body)
    if body in STRATEGIES:
        return RankSpec(body)
    try:
        value = float(body)
    except ValueError:
        raise _SpecError(text) from None
    return _build(text, "ratio", value)
