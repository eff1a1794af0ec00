"""Decomposition cost and inference speed per model and method, on this machine's CPU.

For each torchvision model (random weights, ``torch.manual_seed(0)``, never downloaded) and each
method (tucker, cp, svd, auto) at one rank spec (``ratio:0.5``), in a child process per
measurement (so each peak memory is its own, see :mod:`benchmarks.common`):

- ``decomp.plan.decompose(model, method, rank, input_size, inplace=True)``: wall time and peak
  memory. CP is applied layer by layer through ``decomp.plan.apply``, so that a layer whose CP-ALS
  diverges is reported (``failed``) and the others are still factorized.
- MACs (``decomp.metrics.count_macs``, thop) and params before and after, the plan's own MAC
  estimate beside thop's count.
- Inference latency (``decomp.metrics.measure_latency``) of the original and the compressed model,
  measured back to back in the same child, at each batch size; the speed-up and
  ``latency_efficiency_b<B> = latency_speedup_b<B> / macs_reduction`` (goal >= 0.75).
- Every factorized layer timed alone against its dense original on the input shape it sees in
  the model; the ones slower than dense are listed.
- Tucker: the same layers at the same ranks through decomp, tensorly ``partial_tucker``,
  tensorly-torch ``from_conv`` and the HOSVD floor (see :mod:`benchmarks.bench_tucker`).
- CP: decomp's ``cp_factors`` vs tensorly ``parafac`` at equal rank, layer by layer within a budget.
- vgg16: the SVD of the 25088 -> 4096 classifier layer alone, its time and peak memory.

Writes ``speed.json``, ``speed.md`` and ``speed_latency_vs_macs.png`` (``speed_tiny.*`` with
``--tiny``). Usage, from the repository root::

    python -m benchmarks.bench_speed                       # all models and methods (long)
    python -m benchmarks.bench_speed --models resnet18 --methods tucker svd
    python -m benchmarks.bench_speed --tiny                # a tiny in-file CNN, well under a minute
    python -m benchmarks.bench_speed --threads 1           # on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    Column,
    MemoryProbe,
    apply_within_budget,
    make_meta,
    ratio,
    read_results,
    render_meta,
    render_table,
    run_isolated,
    write_results,
    write_text,
)

MODELS = ("resnet18", "resnet50", "vgg16", "mobilenet_v2")
TINY_MODELS = ("tiny_cnn",)
METHODS = ("tucker", "cp", "svd", "auto")
LATENCY_GOAL = 0.75
"""Wanted ``latency_speedup / macs_reduction``: most of the MAC cut should show up as speed."""


# --------------------------------------------------------------------------- models


class TinyCNN(nn.Module):
    """A small CNN with a residual block, a depthwise conv, 1x1 convs and a classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.conv1 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(16, 32, 1, stride=2, bias=False)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.pointwise = nn.Conv2d(32, 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(y + self.shortcut(x))
        x = torch.relu(self.pointwise(self.depthwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build_model(name: str) -> nn.Module:
    """A randomly initialised model (seed 0), in eval mode; torchvision's are never downloaded."""
    torch.manual_seed(0)
    if name == "tiny_cnn":
        return TinyCNN().eval()
    import torchvision

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted([*MODELS, 'tiny_cnn'])}")
    return getattr(torchvision.models, name)(weights=None).eval()


# --------------------------------------------------------------------------- measurements


def _prepare(threads: int | None) -> None:
    """Set torch's thread count in a child (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def _warm_linalg() -> None:
    """One small eigh, SVD and conv so that library start-up is not charged to a measurement."""
    a = torch.randn(64, 64)
    torch.linalg.eigh(a @ a.T)
    torch.linalg.svd(a)
    nn.functional.conv2d(torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3))


@torch.inference_mode()
def time_module(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``module(x)``."""
    module.eval()
    for _ in range(warmup):
        module(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def trace_inputs(model: nn.Module, names: Sequence[str], input_size: Sequence[int]) -> dict:
    """Input shape of the first call of each named module in one batch-1 forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple, output: Any, name: str = name) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_size))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _repeats(batch: int, repeats: dict[str, int]) -> tuple[int, int]:
    """(warmup, repeats) for a batch size: more at batch 1, fewer for big batches."""
    if batch == 1:
        return repeats["warmup_b1"], repeats["b1"]
    return repeats["warmup_big"], repeats["big"]


def layer_timings(
    original: nn.Module,
    compressed: nn.Module,
    names: Sequence[str],
    input_size: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: dict[str, int],
) -> list[dict[str, Any]]:
    """Each factorized layer alone vs its dense original, on the input shape it sees."""
    shapes = trace_inputs(original, names, input_size)
    rows = []
    for name in names:
        if name not in shapes:
            continue
        dense, fact = original.get_submodule(name), compressed.get_submodule(name)
        for batch in batch_sizes:
            warmup, reps = _repeats(batch, repeats)
            x = torch.randn(batch, *shapes[name][1:])
            dense_ms = time_module(dense, x, warmup, reps)
            fact_ms = time_module(fact, x, warmup, reps)
            rows.append(
                {
                    "layer": name,
                    "kind": type(fact).__name__,
                    "ranks": list(getattr(fact, "ranks", ())),
                    "input_shape": [batch, *shapes[name][1:]],
                    "batch": batch,
                    "dense_ms": dense_ms,
                    "factorized_ms": fact_ms,
                    "factorized_over_dense": ratio(fact_ms, dense_ms),
                }
            )
    return rows


def latency_pair(
    original: nn.Module,
    compressed: nn.Module,
    input_size: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: dict[str, int],
) -> dict[str, Any]:
    """Median latency of both models back to back at each batch size, and the speed-ups."""
    from decomp.metrics import measure_latency

    out: dict[str, Any] = {}
    for batch in batch_sizes:
        warmup, reps = _repeats(batch, repeats)
        kwargs = {"batch_size": batch, "warmup": warmup, "repeats": reps}
        before = measure_latency(original, input_size, **kwargs)
        after = measure_latency(compressed, input_size, **kwargs)
        out[f"latency_orig_ms_b{batch}"] = before["median_ms"]
        out[f"latency_ms_b{batch}"] = after["median_ms"]
        out[f"latency_speedup_b{batch}"] = ratio(before["median_ms"], after["median_ms"])
        # the fastest run is less sensitive to other jobs on a shared machine
        out[f"latency_orig_min_ms_b{batch}"] = before["min_ms"]
        out[f"latency_min_ms_b{batch}"] = after["min_ms"]
        out[f"latency_speedup_min_b{batch}"] = ratio(before["min_ms"], after["min_ms"])
    return out


# --------------------------------------------------------------------------- child tasks


def task_original(
    probe: MemoryProbe,
    model: str,
    input_size: list[int],
    batch_sizes: list[int],
    repeats: dict[str, int],
    threads: int | None = None,
) -> dict[str, Any]:
    """MACs, params and latency of the uncompressed model."""
    from decomp.metrics import count_macs, count_params, measure_latency

    _prepare(threads)
    net = build_model(model)
    _warm_linalg()
    row: dict[str, Any] = {"macs": count_macs(net, input_size), "params": count_params(net)}
    for batch in batch_sizes:
        warmup, reps = _repeats(batch, repeats)
        lat = measure_latency(net, input_size, batch_size=batch, warmup=warmup, repeats=reps)
        row[f"latency_ms_b{batch}"] = lat["median_ms"]
        row[f"latency_min_ms_b{batch}"] = lat["min_ms"]
    return row


def _decompose(net: nn.Module, method: str, rank: str, input_size: list[int]) -> dict[str, Any]:
    """Compress ``net`` in place; report the plan, what was done and the times."""
    from decomp.plan import applied_plans, decompose
    from decomp.plan import plan as make_plan

    start = time.perf_counter()
    if method == "cp":  # plan, then apply layer by layer (no time budget: CP-ALS finishes)
        plan = make_plan(net, method, rank, input_size)
        plan_s = time.perf_counter() - start
        done, failed, _ = apply_within_budget(net, plan, None)
        plan_dict = plan.to_dict()
    else:
        decompose(net, method, rank, input_size, inplace=True)
        plan_dict, plan_s, failed = applied_plans(net)[-1], None, []
        done = [lp["name"] for lp in plan_dict["layers"] if lp["method"]]
    planned = [lp for lp in plan_dict["layers"] if lp["method"]]
    return {
        "decompose_s": time.perf_counter() - start,
        "plan_s": plan_s,
        "planned": planned,
        "done": done,
        "failed": failed,
        "plan_macs_after": plan_dict["model_macs"]
        - sum(lp["macs_before"] - lp["macs_after"] for lp in planned if lp["name"] in done),
    }


def task_method(
    probe: MemoryProbe,
    model: str,
    method: str,
    rank: str,
    input_size: list[int],
    batch_sizes: list[int],
    repeats: dict[str, int],
    threads: int | None = None,
) -> dict[str, Any]:
    """Decompose (timed, peak memory), then MACs, params, latency and per-layer timings."""
    from decomp.metrics import count_macs, count_params

    _prepare(threads)
    net = build_model(model)
    _warm_linalg()
    with probe.section("decompose"):
        info = _decompose(net, method, rank, input_size)
    original = build_model(model)  # the same seed: the same weights as before the surgery
    row = {
        **{k: v for k, v in info.items() if k not in ("planned", "done")},
        "n_planned": len(info["planned"]),
        "n_factorized": len(info["done"]),
        "factorized": [
            {"layer": lp["name"], "method": lp["method"], "ranks": lp["ranks"]}
            for lp in info["planned"]
            if lp["name"] in info["done"]
        ],
        "macs_before": count_macs(original, input_size),
        "params_before": count_params(original),
        "macs": count_macs(net, input_size),
        "params": count_params(net),
    }
    row.update(latency_pair(original, net, input_size, batch_sizes, repeats))
    row["layer_timings"] = layer_timings(
        original, net, info["done"], input_size, batch_sizes, repeats
    )
    return row


def task_tucker_compare(
    probe: MemoryProbe,
    model: str,
    layers: list[dict[str, Any]] | None,
    n_iter_max: int | None,
    threads: int | None = None,
) -> dict[str, Any]:
    """decomp vs tensorly vs tltorch vs the floor on ``layers`` (default: half ranks, kxk)."""
    from benchmarks.bench_tucker import Case, Settings, compare_tucker, half_rank_cases

    _prepare(threads)
    net = build_model(model)
    if layers is None:
        cases = half_rank_cases(net)
    else:
        cases = [Case(d["layer"], net.get_submodule(d["layer"]), tuple(d["ranks"])) for d in layers]
    if not cases:
        return {"rows": [], "summary": None}
    rows, summary = compare_tucker(cases, repeats=1, settings=Settings(n_iter_max=n_iter_max))
    return {"rows": rows, "summary": summary}


def _parafac_kernel(weight: torch.Tensor, rank: int) -> torch.Tensor:
    from decomp._tensorly import parafac

    weights, (a, b, c, d) = parafac(weight.detach(), rank)
    return torch.einsum("r,or,ir,hr,wr->oihw", weights, a, b, c, d)


def task_cp_compare(
    probe: MemoryProbe,
    model: str,
    layers: list[dict[str, Any]],
    budget_s: float,
    threads: int | None = None,
) -> dict[str, Any]:
    """decomp's cp_factors vs tensorly parafac at equal rank, layer by layer, within a budget."""
    from benchmarks.bench_tucker import relative_error
    from decomp.factorize.cp import cp_factors

    _prepare(threads)
    net = build_model(model)
    _warm_linalg()
    rows, start = [], time.perf_counter()
    for item in layers:
        if time.perf_counter() - start > budget_s:
            break
        weight, rank = net.get_submodule(item["layer"]).weight, int(item["ranks"][0])
        row: dict[str, Any] = {"layer": item["layer"], "shape": list(weight.shape), "rank": rank}
        for key, solve in (
            ("decomp", lambda w=weight, r=rank: cp_factors(w, r).reconstruct()),
            ("tensorly", lambda w=weight, r=rank: _parafac_kernel(w, r)),
        ):
            t0 = time.perf_counter()
            try:
                approx = solve()
            except ValueError as exc:
                row[f"{key}_s"], row[f"{key}_error_text"] = time.perf_counter() - t0, str(exc)
                continue
            row[f"{key}_s"] = time.perf_counter() - t0
            row[f"{key}_err"] = relative_error(weight, approx)
        rows.append(row)
    return {"rows": rows, "n_layers": len(layers), "budget_s": budget_s}


def task_svd_big(
    probe: MemoryProbe, model: str, layer: str, rank: int, threads: int | None = None
) -> dict[str, Any]:
    """SVD of one big Linear alone: time and peak memory (no full SVD may be built)."""
    import gc

    from decomp.factorize.svd import svd

    _prepare(threads)
    linear = build_model(model).get_submodule(layer)
    gc.collect()
    _warm_linalg()
    with probe.section("svd"):
        start = time.perf_counter()
        module = svd(linear, rank)
        seconds = time.perf_counter() - start
    out_f, in_f = linear.weight.shape
    with torch.no_grad():
        approx = module.last.weight.double() @ module.first.weight.double()
        weight = linear.weight.double()
        err = float((weight - approx).norm() / weight.norm())
    mib = 4 / 2**20
    return {
        "layer": layer,
        "shape": [out_f, in_f],
        "rank": rank,
        "seconds": seconds,
        "rel_error": err,
        "weight_mb": out_f * in_f * mib,
        "full_svd_outputs_mb": (out_f**2 + in_f**2 + min(out_f, in_f)) * mib,
        "thin_svd_outputs_mb": (out_f * min(out_f, in_f) * 2 + in_f * min(out_f, in_f)) * mib,
    }


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Config:
    """What one run measures."""

    models: list[str]
    methods: list[str]
    rank: str
    input_size: list[int]
    batch_sizes: list[int]
    repeats: dict[str, int]
    cp_compare_budget_s: float
    tucker_n_iter_max: int | None
    timeout_s: float
    threads: int | None
    tiny: bool


ROW_KEYS = (
    "model",
    "method",
    "status",
    "note",
    "decompose_s",
    "plan_s",
    "peak_delta_mb",
    "peak_rss_mb",
    "macs_before",
    "macs",
    "plan_macs_after",
    "macs_reduction",
    "params_before",
    "params",
    "params_reduction",
    "n_planned",
    "n_factorized",
    "n_slower_layers",
    "meets_latency_goal",
)


def _decomp_available() -> str | None:
    """None if decomp.plan and the factorizers import, else why not."""
    try:
        import decomp.factorize.cp  # noqa: F401
        import decomp.factorize.svd  # noqa: F401
        import decomp.plan  # noqa: F401
    except ImportError as exc:
        return f"decomp.plan / factorizers not importable ({exc}); skipped"
    return None


def _finish_method_row(row: dict[str, Any], config: Config) -> None:
    """Derived ratios, the slower-layer list and the latency-goal verdict."""
    row["macs_reduction"] = ratio(row.get("macs_before"), row.get("macs"))
    row["params_reduction"] = ratio(row.get("params_before"), row.get("params"))
    for batch in config.batch_sizes:
        speedup = row.get(f"latency_speedup_b{batch}")
        row[f"latency_efficiency_b{batch}"] = ratio(speedup, row["macs_reduction"])
    effs = [row.get(f"latency_efficiency_b{b}") for b in config.batch_sizes]
    row["meets_latency_goal"] = (
        all(e is not None and e >= LATENCY_GOAL for e in effs) if row["n_factorized"] else None
    )
    slower = [t for t in row["layer_timings"] if t["factorized_ms"] > t["dense_ms"]]
    row["slower_layers"] = [
        {k: t[k] for k in ("layer", "batch", "dense_ms", "factorized_ms")} for t in slower
    ]
    row["n_slower_layers"] = len({t["layer"] for t in slower})
    notes = []
    if row.get("failed"):
        notes.append(f"{len(row['failed'])} layers failed (see failed)")
    row["note"] = "; ".join(notes) or None


def _row(model: str, method: str, result: Any) -> dict[str, Any]:
    """A row skeleton from an IsolatedResult (status, error, memory)."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update({"model": model, "method": method, "status": result.status})
    if result.status != "ok":
        last = (result.error or "").strip().splitlines()[-1:] or [result.status]
        row["note"], row["error"] = last[0], result.error
        return row
    mem = result.memory.get("decompose") or result.memory.get("svd")
    if mem:
        row.update({"peak_delta_mb": mem["peak_delta_mb"], "peak_rss_mb": mem["peak_rss_mb"]})
        row["hwm_reset"] = mem["hwm_reset"]
    row.update(result.value)
    return row


class Runner:
    """Runs every child task of a config, collecting rows and sections."""

    def __init__(self, config: Config, step: Callable[[str], None]) -> None:
        self.config, self.step = config, step
        self.rows: list[dict[str, Any]] = []
        self.sections: dict[str, list[dict[str, Any]]] = {
            "tucker_compare": [],
            "tucker_layers": [],
            "cp_compare": [],
            "cp_layers": [],
            "slow_layers": [],
            "layer_timings": [],
            "svd_big_linear": [],
        }
        self.notes: list[str] = []

    def _run(self, target: Callable[..., Any], **kwargs: Any) -> Any:
        """One child task with this run's timeout and thread count."""
        c = self.config
        return run_isolated(target, c.timeout_s, threads=c.threads, **kwargs)

    def run_model(self, model: str) -> None:
        c = self.config
        common = {"input_size": c.input_size, "batch_sizes": c.batch_sizes, "repeats": c.repeats}
        self.step(f"{model}: original")
        result = self._run(task_original, model=model, **common)
        self.rows.append(_row(model, "original", result))
        missing = _decomp_available()
        by_method: dict[str, dict[str, Any]] = {}
        for method in c.methods:
            self.step(f"{model}: {method}")
            if missing:
                self.rows.append(
                    {
                        **dict.fromkeys(ROW_KEYS),
                        "model": model,
                        "method": method,
                        "status": "skipped",
                        "note": missing,
                    }
                )
                continue
            result = self._run(
                task_method,
                model=model,
                method=method,
                rank=c.rank,
                **common,
            )
            row = _row(model, method, result)
            if result.status == "ok":
                _finish_method_row(row, c)
                self._collect_layers(model, method, row)
                by_method[method] = row
            self.rows.append(row)
        if "tucker" in c.methods:
            self._tucker_compare(model, by_method.get("tucker"))
        if "cp" in c.methods and "cp" in by_method:
            self._cp_compare(model, by_method["cp"])
        if "svd" in c.methods and model == "vgg16" and not missing:
            self._svd_big(model, by_method.get("svd"))

    def _collect_layers(self, model: str, method: str, row: dict[str, Any]) -> None:
        for timing in row.pop("layer_timings"):
            self.sections["layer_timings"].append({"model": model, "method": method, **timing})
        for slow in row["slower_layers"]:
            self.sections["slow_layers"].append({"model": model, "method": method, **slow})

    def _tucker_compare(self, model: str, tucker_row: dict[str, Any] | None) -> None:
        self.step(f"{model}: tucker vs tensorly vs tltorch")
        layers = None
        source = "default rule (Cout//2, Cin//2) on every ungrouped kxk conv"
        if tucker_row is not None:
            layers = [f for f in tucker_row["factorized"] if f["method"] == "tucker"]
            source = "the layers and ranks of decomp's tucker plan"
        result = self._run(
            task_tucker_compare,
            model=model,
            layers=layers,
            n_iter_max=self.config.tucker_n_iter_max,
        )
        summary_row: dict[str, Any] = {"model": model, "status": result.status, "layers": source}
        if result.status != "ok":
            summary_row["note"] = (result.error or "").strip().splitlines()[-1:]
        elif result.value["summary"] is not None:
            s = result.value["summary"]
            summary_row.update(
                {k: v for k, v in s.items() if k != "methods"}
                | {f"{m['method']}_s": m["total_s"] for m in s["methods"]}
                | {f"{m['method']}_mean_err": m["mean_rel_error"] for m in s["methods"]}
            )
            for layer_row in result.value["rows"]:
                self.sections["tucker_layers"].append({"model": model, **layer_row})
        self.sections["tucker_compare"].append(summary_row)

    def _cp_compare(self, model: str, cp_row: dict[str, Any]) -> None:
        self.step(f"{model}: cp vs tensorly parafac")
        layers = [f for f in cp_row["factorized"] if f["method"] == "cp"]
        budget = self.config.cp_compare_budget_s
        result = self._run(task_cp_compare, model=model, layers=layers, budget_s=budget)
        summary: dict[str, Any] = {"model": model, "status": result.status, "budget_s": budget}
        if result.status == "ok":
            rows = result.value["rows"]
            for layer_row in rows:
                self.sections["cp_layers"].append({"model": model, **layer_row})
            summary.update(_cp_summary(rows, len(layers)))
        else:
            summary["note"] = (result.error or "").strip().splitlines()[-1:]
        self.sections["cp_compare"].append(summary)

    def _svd_big(self, model: str, svd_row: dict[str, Any] | None) -> None:
        self.step(f"{model}: svd of the 25088 -> 4096 layer")
        planned = {f["layer"]: f["ranks"][0] for f in (svd_row or {}).get("factorized", [])}
        layer = "classifier.0"
        rank = planned.get(layer, 2048)
        result = self._run(task_svd_big, model=model, layer=layer, rank=rank)
        row = _row(model, "svd", result)
        keep = ("model", "status", "note", "peak_delta_mb", "peak_rss_mb", "hwm_reset")
        row = {k: row.get(k) for k in keep} | (result.value or {})
        row["peak_over_weight"] = ratio(row.get("peak_delta_mb"), row.get("weight_mb"))
        self.sections["svd_big_linear"].append(row)


def _cp_summary(rows: list[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    """Totals over the layers both CP solvers finished."""
    both = [r for r in rows if "decomp_err" in r and "tensorly_err" in r]
    total = {k: sum(r[f"{k}_s"] for r in both) for k in ("decomp", "tensorly")}
    return {
        "n_layers_planned": n_layers,
        "n_layers_compared": len(both),
        "n_layers_tried": len(rows),
        "layers_compared": [r["layer"] for r in both],
        "decomp_s": total["decomp"],
        "tensorly_s": total["tensorly"],
        "speedup_vs_tensorly": ratio(total["tensorly"], total["decomp"]),
        "decomp_mean_err": statistics.fmean(r["decomp_err"] for r in both) if both else None,
        "tensorly_mean_err": statistics.fmean(r["tensorly_err"] for r in both) if both else None,
        "note": None
        if len(rows) == n_layers
        else f"time budget: {len(rows)} of {n_layers} layers tried, in model order",
    }


# --------------------------------------------------------------------------- report


def row_columns(batch_sizes: Sequence[int]) -> list[Column]:
    """The columns of the per-model-and-method table, with latency columns per batch size."""
    cols = [
        Column("model"),
        Column("method"),
        Column("status"),
        Column("decompose_s", "decompose s", ".2f"),
        Column("peak_delta_mb", "peak +MiB", ".0f"),
        Column("macs", "MACs", ",d"),
        Column("macs_reduction", "MACs cut", ".2f"),
        Column("params", "params", ",d"),
        Column("n_factorized", "layers", "d"),
    ]
    for b in batch_sizes:
        cols += [
            Column(f"latency_ms_b{b}", f"ms b{b}", ".2f"),
            Column(f"latency_speedup_b{b}", f"speed-up b{b}", ".2f"),
            Column(f"latency_efficiency_b{b}", f"speed-up/MACs cut b{b}", ".2f"),
        ]
    return [*cols, Column("n_slower_layers", "slower layers", "d"), Column("note")]


TUCKER_COLUMNS = [
    Column("model"),
    Column("n_layers", "layers", "d"),
    Column("decomp_s", "decomp s", ".2f"),
    Column("tensorly_s", "tensorly s", ".2f"),
    Column("tltorch_s", "tltorch s", ".2f"),
    Column("floor_s", "floor s", ".3f"),
    Column("speedup_vs_tensorly", "vs tensorly", ".2f"),
    Column("speedup_vs_tltorch", "vs tltorch", ".2f"),
    Column("decomp_mean_err", "decomp err", ".5f"),
    Column("tensorly_mean_err", "tensorly err", ".5f"),
    Column("tltorch_mean_err", "tltorch err", ".5f"),
    Column("floor_mean_err", "HOSVD err", ".5f"),
    Column("error_no_worse", "err no worse"),
    Column("layers", "layers from"),
]
CP_COLUMNS = [
    Column("model"),
    Column("n_layers_compared", "layers compared", "d"),
    Column("n_layers_planned", "layers planned", "d"),
    Column("decomp_s", "decomp s", ".2f"),
    Column("tensorly_s", "tensorly s", ".2f"),
    Column("speedup_vs_tensorly", "vs tensorly", ".2f"),
    Column("decomp_mean_err", "decomp err", ".5f"),
    Column("tensorly_mean_err", "tensorly err", ".5f"),
    Column("note"),
]
SLOW_COLUMNS = [
    Column("model"),
    Column("method"),
    Column("layer"),
    Column("batch", "batch", "d"),
    Column("dense_ms", "dense ms", ".3f"),
    Column("factorized_ms", "factorized ms", ".3f"),
]
SVD_COLUMNS = [
    Column("model"),
    Column("layer"),
    Column("shape"),
    Column("rank", "rank", "d"),
    Column("seconds", "s", ".2f"),
    Column("peak_delta_mb", "peak +MiB", ".0f"),
    Column("weight_mb", "weight MiB", ".0f"),
    Column("peak_over_weight", "peak / weight", ".2f"),
    Column("full_svd_outputs_mb", "full SVD outputs MiB", ".0f"),
    Column("rel_error", "rel. error", ".4f"),
]


def render_markdown(result: dict[str, Any]) -> str:
    """The report, rendered from a results dict (as read back from the JSON)."""
    config = result["meta"]["config"]
    parts = [
        "# Decomposition cost and inference speed (CPU)",
        "",
        "Generated by `python -m benchmarks.bench_speed` from `speed*.json`; do not edit by hand.",
        "",
        render_meta(result["meta"]),
        "## Models and methods",
        "",
        render_table(result["rows"], row_columns(config["batch_sizes"])),
        f"Latency goal: speed-up / MACs cut >= {LATENCY_GOAL} at every batch size.",
        "",
        "## Tucker-2 at equal ranks: decomp vs tensorly vs tensorly-torch",
        "",
        render_table(result["tucker_compare"], TUCKER_COLUMNS),
        "## CP at equal rank: decomp vs tensorly parafac",
        "",
        render_table(result["cp_compare"], CP_COLUMNS),
        "## Factorized layers slower than the dense layer on this device",
        "",
        render_table(result["slow_layers"], SLOW_COLUMNS) if result["slow_layers"] else "None.\n",
    ]
    if result["svd_big_linear"]:
        parts += ["## SVD of VGG-16's 25088 -> 4096 layer", ""]
        parts += [render_table(result["svd_big_linear"], SVD_COLUMNS)]
    parts += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(parts)


def plot_latency_vs_macs(result: dict[str, Any], path: Path) -> None:
    """Batch-1 latency against MACs, one colour per model, an arrow from original to each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = result["meta"]["config"]["batch_sizes"][0]
    key = f"latency_ms_b{batch}"
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"original": "o", "tucker": "s", "cp": "^", "svd": "D", "auto": "*"}
    ok = [r for r in result["rows"] if r["status"] == "ok" and r.get(key) and r.get("macs")]
    for i, model in enumerate(dict.fromkeys(r["model"] for r in ok)):
        color = f"C{i}"
        rows = [r for r in ok if r["model"] == model]
        base = next((r for r in rows if r["method"] == "original"), None)
        for r in rows:
            label = f"{model} {r['method']}"
            ax.scatter(
                r["macs"], r[key], color=color, marker=markers.get(r["method"], "x"), label=label
            )
            if base is not None and r is not base:
                ax.annotate(
                    "",
                    (r["macs"], r[key]),
                    (base["macs"], base[key]),
                    arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.4},
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MACs per image (thop)")
    ax.set_ylabel(f"median latency, batch {batch} (ms)")
    ax.set_title("Latency vs MACs on " + str(result["meta"]["machine"].get("device_name")))
    ax.grid(True, which="both", alpha=0.3)
    if ok:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _notes(config: Config) -> list[str]:
    return [
        f"Random weights (seed 0), input {config.input_size}, rank {config.rank}; "
        "latency is the median of back-to-back runs of the original and the compressed model "
        "in one child process, on the CPU.",
        "decompose_s: decomp.plan.decompose(..., inplace=True) (plan: tracing, rank selection "
        "and thop MACs, then the factorizations); peak +MiB: VmHWM rise above the RSS at the "
        "start of the call, in a child process of its own (benchmarks/common.py).",
        "CP: every planned layer is factorized (no time budget: decomp's CP-ALS finishes in "
        "seconds per layer, see bench_cp.py). The CP comparison with tensorly's parafac, which "
        f"needs minutes per large layer, tries layers in model order for "
        f"{config.cp_compare_budget_s:g} s; bench_cp.py compares every layer.",
        "Tucker comparison: tensorly and tltorch at the library defaults "
        + (
            "(100 sweeps)"
            if config.tucker_n_iter_max is None
            else f"but n_iter_max={config.tucker_n_iter_max} for all"
        )
        + "; one pass per layer (bench_tucker.py repeats and takes the fastest).",
        "speed-up/MACs cut = latency speed-up / (MACs before / MACs after).",
        f"torch threads in every child: {config.threads or 'torch default'}. On a machine "
        "shared with other jobs, several threads per op wait for each other at every barrier "
        "(tens of ms per op): use --threads 1 there. Compare ratios within one run, never "
        "absolute times.",
    ]


# --------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny CNN at 32x32 (smoke test)")
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--rank", default="ratio:0.5", help="rank spec for every method")
    parser.add_argument("--input-size", type=int, nargs=3, default=None, help="C H W (3 64 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 64")
    parser.add_argument("--cp-compare-budget", type=float, default=None, help="s per model (60)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="s per child process")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in the children (tiny: 1)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    tiny = args.tiny
    return Config(
        models=list(args.models or (TINY_MODELS if tiny else MODELS)),
        methods=list(args.methods or METHODS),
        rank=args.rank,
        input_size=list(args.input_size or ((3, 32, 32) if tiny else (3, 64, 64))),
        batch_sizes=list(args.batch_sizes or ((1, 8) if tiny else (1, 64))),
        repeats={"warmup_b1": 2, "b1": 5, "warmup_big": 1, "big": 2}
        if tiny
        else {"warmup_b1": 3, "b1": 15, "warmup_big": 1, "big": 3},
        cp_compare_budget_s=args.cp_compare_budget
        if args.cp_compare_budget is not None
        else (10.0 if tiny else 60.0),
        tucker_n_iter_max=10 if tiny else None,
        timeout_s=min(args.timeout, 300.0) if tiny else args.timeout,
        threads=args.threads or (1 if tiny else None),
        tiny=tiny,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``speed[_tiny].json``, ``.md`` and the plot into ``--output``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    args = parse_args(argv)
    config = make_config(args)
    for model in config.models:
        if model not in (*MODELS, *TINY_MODELS):
            raise SystemExit(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
    console = Console(stderr=True)
    steps_per_model = 1 + len(config.methods) + ("tucker" in config.methods) + 2
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("bench-speed", total=steps_per_model * len(config.models))
        runner = Runner(config, lambda label: bar.update(task, advance=1, description=label))
        for model in config.models:
            runner.run_model(model)
        bar.update(task, completed=steps_per_model * len(config.models), description="done")
    stem = "speed_tiny" if config.tiny else "speed"
    json_path = Path(args.output) / f"{stem}.json"
    meta = make_meta(dataclasses.asdict(config), latency_goal=LATENCY_GOAL)
    write_results(json_path, meta, runner.rows, **runner.sections, notes=_notes(config))
    result = read_results(json_path)
    write_text(json_path.with_suffix(".md"), render_markdown(result))
    plot_latency_vs_macs(result, json_path.with_name(f"{stem}_latency_vs_macs.png"))
    bad = [f"{r['model']}/{r['method']}: {r['status']}" for r in runner.rows if r["status"] != "ok"]
    console.print(f"wrote {json_path}" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
