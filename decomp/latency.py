"""Measured cost per layer: latency tables that a latency budget spends.

MACs are a poor guide to speed: a deep Tucker-2 cut runs a thin 1x1, a thin core and another
1x1 where one conv ran, and in eager PyTorch each of them pays a fixed overhead (FACTS.md 7). So
a latency budget spends *measured* time, the way NetAdapt (Yang et al., "NetAdapt:
Platform-aware neural network adaptation for mobile applications", ECCV 2018) spends empirical
per-layer latency tables.

- :class:`LatencyTable`: for one :class:`~decomp.timing.Key` (runtime, device, batch, threads,
  versions, processor), each layer geometry's dense latency and its factorized latency at a
  handful of ranks (a subset of the method's :class:`~decomp.factorize.registry.RankGrid`,
  snapped to multiples of the runtime's :func:`align_for`), and the baseline latency of whole
  models. JSON, written atomically; a table is refused for another key.
  :meth:`LatencyTable.layer_ms` interpolates between the measured ranks (linearly in the
  factorized layer's MACs).
- :func:`profile`: fill a table for a model's eligible layers (only the geometries it lacks).
- :func:`parse_latency_target`: a budget as a fraction of the baseline or a time.

The timing itself (runners, interleaved rounds, paired whole-model speed-ups) is
:mod:`decomp.timing`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from decomp._utils import PathLike, atomic_write_text, plain
from decomp.factorize.registry import Call, Method, RankGrid
from decomp.timing import LAYER_TIMING, Key, interleaved, measure_model, runner

logger = logging.getLogger(__name__)

__all__ = [
    "ALIGN",
    "align_for",
    "LatencyTable",
    "measured_ranks",
    "parse_latency_target",
    "profile",
    "snapped_grid",
]

TABLE_FORMAT = 1
ALIGN = {"onnxruntime": {1: 8}, "torch": {1: 4, 16: 16}}
"""Ranks the budget gives, as multiples, by runtime and least batch. Measured on this project's
2-core x86 CPU (``make bench-latency``, "Rank alignment"; docs/latency.md): under ONNX Runtime
rounding a rank up to a multiple of 8 is free in 94-100% of cases and the larger rank usually
runs faster (its convs work on blocks of channels); in eager PyTorch at batch 64 rounding up to
a multiple of 16 is free (70-100%), at batch 1 only multiples of 4 nearly are (multiples of 16
cost 10-27% more time)."""


def align_for(runtime: str, batch: int) -> int:
    """The rank multiple of :data:`ALIGN` for ``runtime`` at ``batch``."""
    steps = ALIGN[runtime]
    return steps[max(b for b in steps if b <= batch)]


POINTS = 6
"""Factorized ranks measured per layer geometry (besides the dense layer)."""


# --------------------------------------------------------------------------- keys and tables


def layer_signature(layer: nn.Module, method: Method, call: Call) -> str:
    """A layer's geometry, its method and its input shape (batch left out): what its latency
    depends on. The weights do not enter, so equal layers share one entry."""
    if isinstance(layer, nn.Linear):
        geometry = f"Linear({layer.in_features},{layer.out_features},bias={layer.bias is not None})"
    else:
        geometry = (
            f"Conv2d({layer.in_channels},{layer.out_channels},k={list(layer.kernel_size)},"
            f"s={list(layer.stride)},p={list(layer.padding)},d={list(layer.dilation)},"
            f"g={layer.groups},bias={layer.bias is not None},{layer.padding_mode})"
        )
    return f"{method.name}:{geometry}:in={list(call.inp[1:])}"


def model_fingerprint(model: nn.Module, input_size: Sequence[int]) -> str:
    """A short hash of the model's architecture (every module's name, type and settings) and
    input size: the key of its measured baseline."""
    parts = [str(list(input_size))]
    parts += [f"{n}:{type(m).__name__}:{m.extra_repr()}" for n, m in model.named_modules()]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class LatencyTable:
    """Measured latencies for one :class:`Key`, in milliseconds per call.

    ``layers`` maps a :func:`layer_signature` to ``{"method", "dense_ms", "dense_macs",
    "points": [{"ranks", "macs", "ms"}, ...]}`` (points ascending); ``models`` maps a
    :func:`model_fingerprint` to ``{"baseline_ms", "input_size"}``.
    """

    key: Key
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- files

    def to_dict(self) -> dict[str, Any]:
        return plain({"format": TABLE_FORMAT, "key": asdict(self.key), **_fields(self)})

    def save(self, path: PathLike) -> Path:
        """Write the table as JSON, atomically (readers see the old file or the new one)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n", parents=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or "key" not in data:
            raise ValueError(f"not a decomp latency table (format {TABLE_FORMAT})")
        key = Key(**data["key"])
        return cls(key, data.get("layers", {}), data.get("models", {}), data.get("meta", {}))

    @classmethod
    def load(cls, path: PathLike, key: Key | None = None) -> LatencyTable:
        """Read a table; with ``key``, a ValueError unless it was measured for that key."""
        try:
            table = cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}: cannot read a latency table ({exc})") from None
        if key is not None:
            table.check_key(key, str(path))
        return table

    def check_key(self, key: Key, where: str = "latency table") -> None:
        """A ValueError naming what differs unless the table was measured for ``key``."""
        diff = self.key.differences(key)
        if diff:
            raise ValueError(
                f"{where} was measured for {self.key.describe()}, not {key.describe()} "
                f"({'; '.join(diff)}); profile again for this setting or use another table"
            )

    # ---- entries

    def add_layer(
        self,
        layer: nn.Module,
        method: Method,
        call: Call,
        dense_ms: float,
        points: Sequence[tuple[Sequence[int], float]],
    ) -> None:
        """Record one geometry: its dense latency and ``(ranks, ms)`` at measured ranks."""
        rows = [
            {"ranks": list(r), "macs": _macs(method, layer, r, call), "ms": float(ms)}
            for r, ms in points
        ]
        rows.sort(key=lambda row: row["macs"])
        self.layers[layer_signature(layer, method, call)] = {
            "method": method.name,
            "dense_ms": float(dense_ms),
            "dense_macs": _dense_macs(layer, call),
            "points": rows,
        }

    def entry(self, layer: nn.Module, method: Method, call: Call) -> dict[str, Any] | None:
        return self.layers.get(layer_signature(layer, method, call))

    def _entry(self, layer: nn.Module, method: Method, call: Call) -> dict[str, Any]:
        found = self.entry(layer, method, call)
        if found is None:
            raise KeyError(f"no latency measured for {layer_signature(layer, method, call)}")
        return found

    def dense_ms(self, layer: nn.Module, method: Method, calls: Sequence[Call]) -> float:
        """The layer's measured latency as it is, summed over its calls."""
        return sum(self._entry(layer, method, c)["dense_ms"] for c in calls)

    def layer_ms(
        self, layer: nn.Module, method: Method, ranks: Sequence[int], calls: Sequence[Call]
    ) -> float:
        """The factorized layer's latency at ``ranks``, summed over its calls: interpolated
        linearly in its MACs between the measured ranks, held at the end points."""
        total = 0.0
        for c in calls:
            points = self._entry(layer, method, c)["points"]
            macs = [p["macs"] for p in points]
            total += float(
                np.interp(_macs(method, layer, ranks, c), macs, [p["ms"] for p in points])
            )
        return total

    def fastest_ms(self, layer: nn.Module, method: Method, calls: Sequence[Call]) -> float:
        """The least factorized latency measured for the layer (summed over its calls)."""
        return sum(min(p["ms"] for p in self._entry(layer, method, c)["points"]) for c in calls)

    def set_baseline(self, model: nn.Module, input_size: Sequence[int], ms: float) -> None:
        """Record the measured whole-model latency of ``model`` at ``input_size``."""
        self.models[model_fingerprint(model, input_size)] = {
            "baseline_ms": float(ms),
            "input_size": list(input_size),
        }

    def baseline_ms(self, model: nn.Module, input_size: Sequence[int]) -> float | None:
        found = self.models.get(model_fingerprint(model, input_size))
        return None if found is None else float(found["baseline_ms"])


def _fields(table: LatencyTable) -> dict[str, Any]:
    return {"layers": table.layers, "models": table.models, "meta": table.meta}


def _macs(method: Method, layer: nn.Module, ranks: Sequence[int], call: Call) -> int:
    return int(method.costs(layer, list(ranks), [call])[0])


def _dense_macs(layer: nn.Module, call: Call) -> int:
    from decomp.plan.trace import dense_costs

    return int(dense_costs(layer, [call])[0])


# --------------------------------------------------------------------------- rank grids


def snapped_grid(grid: RankGrid, align: int) -> RankGrid:
    """``grid`` with every rank rounded up to a multiple of ``align`` (at most the grid's largest
    rank in that mode), repeated rank tuples dropped; the increment keeps the number of moves
    about what it was."""
    if align <= 1:
        return grid
    top = grid.ranks(grid.steps)
    snapped = []
    for k in range(1, grid.steps + 1):
        ranks = [min(-(-r // align) * align, t) for r, t in zip(grid.ranks(k), top, strict=True)]
        if not snapped or ranks != snapped[-1]:
            snapped.append(ranks)
    increment = max(1, grid.increment * len(snapped) // grid.steps)
    return RankGrid(len(snapped), lambda k: list(snapped[k - 1]), increment)


def measured_ranks(grid: RankGrid, points: int = POINTS) -> list[list[int]]:
    """About ``points`` ranks of ``grid`` to measure, spaced geometrically from its first step
    to its last (dense in the low ranks, where budgets spend)."""
    steps = np.unique(np.round(np.geomspace(1, grid.steps, max(points, 2))).astype(int))
    return [grid.ranks(int(k)) for k in steps]


# --------------------------------------------------------------------------- measuring


def _plain_copy(layer: nn.Module) -> nn.Module:
    """A plain ``nn.Conv2d`` / ``nn.Linear`` of the layer's geometry (random weights)."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    return nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )


@torch.no_grad()
def structure(method: Method, layer: nn.Module, ranks: Sequence[int]) -> nn.Module:
    """The factorized module at ``ranks``, with small random weights (shapes are what time
    depends on; uninitialised memory could hold denormals, which are slow)."""
    module = method.build(layer, list(ranks))
    for p in module.parameters():
        p.normal_(0, 0.05)
    return module


def measure_layer(
    table: LatencyTable, layer: nn.Module, method: Method, call: Call, align: int, points: int
) -> None:
    """Time one geometry dense and factorized at :func:`measured_ranks` of its snapped grid,
    interleaved, and add it to ``table``."""
    plain_layer = _plain_copy(layer)
    grid = snapped_grid(method.grid(plain_layer, _grid_points()), align)
    ranks = measured_ranks(grid, points)
    x = torch.randn(table.key.batch, *call.inp[1:])
    modules = [plain_layer] + [structure(method, plain_layer, r) for r in ranks]
    runs = [runner(m, x, table.key) for m in modules]
    times = interleaved(runs, table.key, **LAYER_TIMING)
    medians = [statistics.median(t) for t in times]
    table.add_layer(layer, method, call, medians[0], list(zip(ranks, medians[1:], strict=True)))


def _grid_points() -> int:
    from decomp.plan.budget import GRID

    return GRID


def profile(
    model: nn.Module,
    method: str = "auto",
    input_size: Sequence[int] = (3, 32, 32),
    *,
    runtime: str = "torch",
    device: str = "cpu",
    batch: int = 1,
    threads: int | None = None,
    table: LatencyTable | PathLike | None = None,
    exclude: Sequence[str] = (),
    align: int | None = None,
    points: int = POINTS,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measure what a latency budget needs for ``model``: the whole model's baseline and, for
    every layer ``method`` would factorize, its dense latency and its latency at about
    ``points`` ranks (geometries already in ``table`` are not measured again).

    Args:
        model: the model; its weights are never touched (layers are timed as fresh copies).
        method: as for :func:`decomp.plan` ("auto", "tucker", "svd", ...).
        input_size: (C, H, W) of one input.
        runtime: "torch" (eager) or "onnxruntime".
        device: "cpu" or "cuda".
        batch: images per call.
        threads: intra-op threads (default: torch's current number).
        table: a table to extend, or a JSON file to extend (created if missing); it must have
            been measured for the same key.
        exclude: fnmatch patterns of layers to leave out, as for :func:`decomp.plan`.
        align: measure ranks that are multiples of this (default :func:`align_for` the runtime
            and batch).
        points: factorized ranks measured per geometry.
        progress: called with each geometry's signature once it is measured.

    Returns:
        The table (also written to ``table`` when that is a path).
    """
    key = Key.current(runtime, device, batch, threads)
    path = None if isinstance(table, LatencyTable) or table is None else Path(table)
    if path is not None:
        table = LatencyTable.load(path, key) if path.exists() else None
    if table is None:
        table = LatencyTable(key)
    table.check_key(key)
    start = time.perf_counter()
    todo = missing_layers(table, model, method, input_size, exclude)
    for layer, chosen, call in todo:
        measure_layer(table, layer, chosen, call, align or align_for(runtime, batch), points)
        if progress is not None:
            progress(layer_signature(layer, chosen, call))
    if table.baseline_ms(model, input_size) is None:
        table.set_baseline(model, input_size, measure_model(model, input_size, key))
    seconds = time.perf_counter() - start
    table.meta.update(_load_record(), profile_s=round(table.meta.get("profile_s", 0) + seconds, 1))
    logger.info(
        "profile: %d geometries measured in %.1f s (%s)", len(todo), seconds, key.describe()
    )
    if path is not None:
        table.save(path)
    return table


def missing_layers(
    table: LatencyTable,
    model: nn.Module,
    method: str,
    input_size: Sequence[int],
    exclude: Sequence[str] = (),
) -> list[tuple[nn.Module, Method, Call]]:
    """One ``(plain layer, method, call)`` per geometry the table lacks, in model order."""
    from decomp.plan import candidate_calls

    todo, seen = [], set()
    for candidate, calls in candidate_calls(model, method, input_size, exclude):
        for call in calls:
            signature = layer_signature(candidate.layer, candidate.method, call)
            if signature not in table.layers and signature not in seen:
                seen.add(signature)
                todo.append((candidate.layer, candidate.method, call))
    return todo


def _load_record() -> dict[str, Any]:
    from decomp._utils import machine

    info = machine()
    return {"timestamp": info["timestamp"], "load_average": info["load_average"]}


# --------------------------------------------------------------------------- targets and pairs


_TIME_UNITS = {"ms": 1.0, "s": 1e3, "us": 1e-3}


def parse_latency_target(target: float | str, baseline_ms: float) -> float:
    """A latency budget in milliseconds: a fraction in (0, 1] of ``baseline_ms`` (0.5, "0.5"),
    or a time ("3ms", "2.5 ms", "800us", "0.01s")."""
    value, unit = None, None
    if isinstance(target, int | float) and not isinstance(target, bool):
        value = float(target)
    elif isinstance(target, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|us|s)?\s*", target.lower())
        if match:
            value, unit = float(match.group(1)), match.group(2)
    if value is not None and unit is not None and value > 0:
        return value * _TIME_UNITS[unit]
    if value is not None and unit is None and 0 < value <= 1:
        return value * baseline_ms
    raise ValueError(
        f"bad latency target {target!r}; expected a fraction in (0, 1] of the measured "
        "baseline like 0.5, or a time like 3ms, 800us"
    )
