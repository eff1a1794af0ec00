"""The Plan: per-layer decisions as plain data, with a JSON round trip.

A :class:`LayerPlan` says what happens to one layer: its method and ranks and its costs before
and after, or, when it is left alone, a :class:`Skip` kind beside the sentence that explains it.
The kind is what programs read (the CLI's short cells, tests, scripts); the sentence is for
people and may be reworded freely.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from decomp.factorize import registry
from decomp.factorize.base import Whitening

PLAN_FORMAT = 1


class Skip(StrEnum):
    """Why a layer is left alone; the value is a few words for a table cell."""

    EXCLUDED = "excluded"
    FACTORIZED = "factorized"
    NOT_CALLED = "not called"
    GROUPED = "grouped conv"
    LAYER_KIND = "layer kind"
    CUSTOM_FORWARD = "custom forward"
    RANK_ZERO = "rank 0"
    NO_SAVING = "no MAC saving"
    BUDGET = "budget keeps dense"
    NOT_FASTER = "not faster"


@dataclass
class LayerPlan:
    """What happens to one layer. ``method`` is None when it is skipped: then ``skip`` says
    which kind of reason and ``reason`` says it in a sentence.

    ``ranks`` is one entry per rank mode of the method (``[r_out, r_in]`` for tucker, ``[R]``
    for cp and svd). MACs count every call of the layer in one batch-1 forward pass, the way
    thop counts them (no bias terms).
    """

    name: str
    kind: str
    shape: list[int]
    method: str | None = None
    ranks: list[int] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    reason: str = ""
    aliases: list[str] = field(default_factory=list)
    importance: float | None = None
    """With a MACs budget and data: the mean weight the layer's error curve was given (measured
    output damage per unit of estimated error, relative to the mean over every layer's probes;
    see :mod:`decomp.plan.importance`). None otherwise."""
    skip: Skip | None = None
    pad: str | list[int] | None = None
    """Zero padding the layer did in its own forward, carried over in front of its factorized
    module: "same" (TensorFlow's, computed per input) or fixed [left, right, top, bottom]; None
    for a plain layer (see :mod:`decomp.plan.forwards`)."""
    fit: str = "weights"
    """What the factorization fits: "weights", or "outputs" on calibration data (see
    :mod:`decomp.plan.statistics`)."""
    previous_ranks: list[int] = field(default_factory=list)
    """For a layer that is already factorized (a second decomposition): the ranks it has now.
    It is re-factorized at lower ranks of the same method (its 'shape' is that of the weight
    its factors define), so that factorized modules merge instead of nesting."""

    def __post_init__(self) -> None:
        if self.skip is not None:
            self.skip = Skip(self.skip)

    def skip_as(self, kind: Skip, reason: str) -> None:
        """Leave the layer alone for ``reason``."""
        self.method, self.ranks = None, []
        self.macs_after, self.params_after = self.macs_before, self.params_before
        self.skip, self.reason = kind, reason

    @property
    def short_reason(self) -> str:
        """A few words for a table cell: "excluded", "1x1 conv", "no MAC saving", ...; empty
        when the layer is factorized."""
        if self.skip is None:
            return ""
        if self.skip is Skip.LAYER_KIND:
            return self.reason.split(":")[0]
        return self.skip.value


def _plain_items(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in items}


@dataclass
class Plan:
    """The per-layer decisions for one model: plain data, JSON round-trip."""

    method: str
    rank: str
    input_size: list[int]
    layers: list[LayerPlan]
    model_macs: int = 0
    model_params: int = 0
    format: int = PLAN_FORMAT
    fit: str = "weights"
    """"weights", or "outputs" when calibration data was given; then ``fit_batches`` and
    ``fit_images`` say on how many batches and images the layers' input statistics were
    measured (what the data held, up to the batches asked for)."""
    fit_batches: int = 0
    fit_images: int = 0
    notes: list[str] = field(default_factory=list)
    """What a reader of the plan should know beyond the per-layer rows (rank floors, fits)."""
    whitening: dict[str, Whitening] | None = field(default=None, repr=False, compare=False)
    """The input statistics of an output-aware plan, by layer name, kept for :func:`apply` in
    the same process; never saved (apply measures them again from ``data`` when missing)."""

    @property
    def decomposed(self) -> list[LayerPlan]:
        """The layers that get a factorization."""
        return [layer for layer in self.layers if layer.method]

    @property
    def macs_after(self) -> int:
        """Model MACs once applied (thop's count)."""
        return self.model_macs - sum(lp.macs_before - lp.macs_after for lp in self.decomposed)

    @property
    def params_after(self) -> int:
        """Model parameters once applied."""
        return self.model_params - sum(lp.params_before - lp.params_after for lp in self.decomposed)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the skip kinds as their strings; no input statistics)."""
        out = asdict(replace(self, whitening=None), dict_factory=_plain_items)
        out.pop("whitening")
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a Plan, with a clear ValueError when the data is not one."""
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError("not a decomp plan: expected an object with 'layers'")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise ValueError(f"plan format {data.get('format')!r}; this decomp reads {PLAN_FORMAT}")
        try:
            layers = [LayerPlan(**layer) for layer in data["layers"]]
            plan = cls(**{**data, "layers": layers, "whitening": None})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a decomp plan: {exc}") from None
        for layer in plan.decomposed:
            try:
                registry.get(layer.method)
            except ValueError as exc:
                raise ValueError(f"{layer.name}: {exc}") from None
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)
