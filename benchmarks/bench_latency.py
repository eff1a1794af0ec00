"""Latency budgets, measured: where ``target_latency`` lands, how much of the MAC cut shows as
speed, and what it costs in F1 against a MACs budget at the same measured latency.

Part 1, landing rows: for resnet18, resnet50 and vgg16 at 64 px (random weights, seed 0) and the
demo's resnet18 at 32 px (its trained baseline when there is one), under eager PyTorch and ONNX
Runtime, at batch 1 and 64, for targets of 1/2 and 1/4 of the measured baseline:

- ``decomp.latency.profile`` fills a per-layer latency table (cached under ``--tables``);
- ``decomp.plan(..., method="auto", target_latency=T, runtime=R, batch=B)`` plans;
- ``decomp.apply`` factorizes (real weights), and ``decomp.timing.paired_latency`` times the
  result paired with the original: landing = measured latency / target, speed-up with its
  spread, MACs cut (thop), efficiency = speed-up / MACs cut, the output's relative error on a
  random batch; for ONNX Runtime rows, the same model's eager speed-up beside it.

A target below the floor is recorded with the error that names the floor.

Part 2, F1 rows: on the demo's trained resnet18 (``runs/demo/baseline.pt``, else
``--baseline``, else one trained here with :func:`decomp.recipes.train_baseline`), for each
target the latency plan is matched by a MACs budget whose model measures the same latency
(bisection on ``target_macs``, paired measurements); both are factorized, batch-norm calibrated,
fine-tuned the same way and tested.

Rows are written as they finish and a rerun skips the rows it has (``--fresh`` starts over);
``--budget-s`` bounds the run. Usage, from the repository root (under the shared lock)::

    flock /tmp/decomp-bench.lock python -m benchmarks.bench_latency
    python -m benchmarks.bench_latency --models resnet18 --runtimes onnxruntime --no-f1
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    Column,
    make_meta,
    read_results,
    render_meta,
    render_table,
    shown_path,
    write_results,
    write_text,
)

MODELS = {
    "resnet18": (3, 64, 64),
    "demo_resnet18": (3, 32, 32),
    "resnet50": (3, 64, 64),
    "vgg16": (3, 64, 64),
}
RUNTIMES = ("onnxruntime", "torch")
BATCHES = (1, 64)
TARGETS = (0.5, 0.25)
METHOD = "auto"
EFFICIENCY_GOAL = 0.85
"""Speed-up / MACs cut a latency plan should reach under :data:`GOAL_RUNTIME` at
:data:`GOAL_TARGET`."""
GOAL_RUNTIME = "onnxruntime"
GOAL_TARGET = 0.5
LANDING_WINDOW = (0.85, 1.0)
"""Where a model's measured latency should land, as a share of its target: what decomp.plan
promises (``decomp.plan.latency_budget.ACCEPTED``, which a test holds this to; the script does
not import torch before it runs)."""
DEMO_BASELINE = REPO / "runs" / "demo" / "baseline.pt"
WORK_DIR = REPO / "runs" / "bench-latency"


@dataclasses.dataclass
class Config:
    models: list[str]
    runtimes: list[str]
    batches: list[int]
    targets: list[float]
    threads: int
    budget_s: float
    f1: bool
    alignment: bool
    f1_runtime: str
    f1_batch: int
    baseline: str | None
    baseline_epochs: int
    finetune_epochs: int
    finetune_subset: int | None
    tables: str


# --------------------------------------------------------------------------- models


def build_model(name: str, cfg: Config) -> nn.Module:
    """A torchvision model with random weights (seed 0), or the demo's trained resnet18."""
    import torchvision

    if name == "demo_resnet18":
        return demo_baseline(cfg).eval()
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def demo_baseline(cfg: Config) -> nn.Module:
    """The demo's trained baseline (``--baseline``, else runs/demo/baseline.pt), else one
    trained here once (``runs/bench-latency/baseline.pt``)."""
    import decomp
    from decomp.recipes import DEFAULT_ARCH, DEFAULT_DATA, train_baseline

    for path in [cfg.baseline, DEMO_BASELINE, WORK_DIR / "baseline.pt"]:
        if path and Path(path).exists():
            return decomp.load(path)
    train_baseline(
        DEFAULT_ARCH,
        None,
        DEFAULT_DATA,
        MODELS["demo_resnet18"],
        cfg.baseline_epochs,
        WORK_DIR / "baseline.pt",
        seed=0,
        augment=False,
        evaluate_test=False,
    )
    return decomp.load(WORK_DIR / "baseline.pt")


def baseline_source(cfg: Config) -> str:
    for path in [cfg.baseline, DEMO_BASELINE, WORK_DIR / "baseline.pt"]:
        if path and Path(path).exists():
            return shown_path(path)
    return "none yet"


# --------------------------------------------------------------------------- part 0: alignment

ALIGN_GEOMETRIES = ((64, 16), (128, 8), (256, 4))
"""(channels, spatial size) of the 3x3 convs whose Tucker-2 cores the alignment part times."""
ALIGN_RANKS = range(16, 57)
ALIGNS = (4, 8, 16, 32)


def alignment_rows(cfg: Config, runtime: str, batch: int) -> list[dict[str, Any]]:
    """Is a rank rounded up to a multiple of ``a`` free? For each geometry, every rank in
    :data:`ALIGN_RANKS` is timed (Tucker-2 at ranks (r, r), interleaved) and for each ``a``
    the rows say how often the next multiple of ``a`` costs at most 5% more than ``r``."""
    from decomp import latency, timing
    from decomp.factorize import registry

    key = timing.Key.current(runtime, "cpu", batch, cfg.threads)
    tucker, rows = registry.get("tucker"), []
    for channels, hw in ALIGN_GEOMETRIES:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        x = torch.randn(batch, channels, hw, hw)
        modules = [latency.structure(tucker, conv, [r, r]) for r in ALIGN_RANKS]
        runs = [timing.runner(m, x, key) for m in modules]
        times = timing.interleaved(runs, key, rounds=3, block_s=0.005)
        ms = {r: sorted(t)[1] for r, t in zip(ALIGN_RANKS, times, strict=True)}
        for align in ALIGNS:
            pairs = [
                (ms[r], ms[-(-r // align) * align])
                for r in ms
                if r % align and -(-r // align) * align in ms
            ]
            rows.append(
                {
                    "runtime": runtime,
                    "batch": batch,
                    "channels": channels,
                    "size": hw,
                    "align": align,
                    "ranks": len(pairs),
                    "free": sum(up <= 1.05 * at for at, up in pairs) / max(len(pairs), 1),
                    "median_up_over_r": float(np.median([up / at for at, up in pairs])),
                }
            )
    return rows


# --------------------------------------------------------------------------- part 1


def table_path(cfg: Config, model: str, runtime: str, batch: int) -> Path:
    return Path(cfg.tables) / f"{model}-{runtime}-b{batch}-t{cfg.threads}.json"


def relative_error(original: nn.Module, compressed: nn.Module, size: Sequence[int]) -> float:
    x = torch.randn(8, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = original(x), compressed(x)
    return float((out - ref).norm() / ref.norm())


def landing_rows(
    cfg: Config, name: str, runtime: str, batch: int, todo: list[float]
) -> list[dict[str, Any]]:
    """One row per target for one model, runtime and batch (one profile for all of them)."""
    import decomp
    from decomp import latency, timing
    from decomp.metrics import count_macs
    from decomp.plan import Skip

    net, size = build_model(name, cfg), MODELS[name]
    setting = {"runtime": runtime, "batch": batch, "threads": cfg.threads}
    table = latency.profile(
        net, METHOD, size, table=table_path(cfg, name, runtime, batch), **setting
    )
    profile_s = table.meta["profile_s"]  # what measuring the table took (first run included)
    macs = count_macs(net, size)
    rows = []
    for target in todo:
        row: dict[str, Any] = {"model": name, "input": list(size), **setting, "target": target}
        row.update(profile_s=round(profile_s, 1), macs_before=macs)
        row["baseline_ms"] = table.baseline_ms(net, size)
        start = time.perf_counter()
        try:
            p = decomp.plan(
                net, METHOD, input_size=size, target_latency=target, latency_table=table, **setting
            )
        except ValueError as exc:
            rows.append({**row, "status": "infeasible", "message": str(exc)})
            continue
        row["plan_s"] = round(time.perf_counter() - start, 1)
        compressed = decomp.apply(net, p)
        measured = timing.paired_latency(net, compressed, size, **setting)
        row.update(_measured(measured, target, macs, count_macs(compressed, size)))
        row.update(
            status="ok",
            error=relative_error(net, compressed, size),
            factorized=len(p.decomposed),
            not_faster=sum(lp.skip is Skip.NOT_FASTER for lp in p.layers),
            plan_tries=p.latency["tries"],
            plan_landing=p.latency.get("landing"),
            scale=p.latency["scale"],
            ranks={lp.name: lp.ranks for lp in p.decomposed},
        )
        if runtime == "onnxruntime":
            eager = timing.paired_latency(net, compressed, size, batch=batch, threads=cfg.threads)
            row["eager_speedup"] = eager["speedup"]
            row["eager_efficiency"] = eager["speedup"] / row["macs_cut"]
        rows.append(row)
        del compressed
        gc.collect()
    return rows


def _measured(measured: dict, target: float, macs: int, macs_after: int) -> dict[str, Any]:
    cut = macs / macs_after
    return {
        "landing": measured["ratio"] / target,
        "speedup": measured["speedup"],
        "speedup_iqr": measured["speedup_iqr"],
        "original_ms": measured["original_ms"],
        "compressed_ms": measured["compressed_ms"],
        "rounds": measured["rounds"],
        "load_average": measured["load_average"],
        "macs_after": macs_after,
        "macs_cut": cut,
        "efficiency": measured["speedup"] / cut,
    }


# --------------------------------------------------------------------------- part 2


def matched_macs_plan(base: nn.Module, size: Sequence[int], ratio: float, setting: dict) -> tuple:
    """A MACs-budget plan whose model measures ``ratio`` of the original's latency (paired),
    by bisection on ``target_macs``: ``(plan, measured ratio, target_macs, steps)``."""
    import decomp
    from decomp import timing

    low, high, best, steps = 0.02, 1.0, None, []
    for _ in range(8):
        middle = (low + high) / 2
        p = decomp.plan(base, METHOD, input_size=size, target_macs=middle)
        built = decomp.apply(base, p, init="structure")
        got = timing.paired_latency(base, built, size, **setting)["ratio"]
        steps.append({"target_macs": middle, "ratio": got})
        if best is None or abs(got - ratio) < abs(best[1] - ratio):
            best = (p, got, middle)
        if abs(got - ratio) <= 0.03 * ratio:
            break
        low, high = (middle, high) if got < ratio else (low, middle)
    return (*best, steps)


def f1_row(cfg: Config, target: float, bundle: Any) -> dict[str, Any]:
    """Latency budget vs a MACs budget at the same measured latency, after the same fine-tune."""
    import decomp
    from decomp import latency, timing
    from decomp.metrics import count_macs
    from decomp.recipes import CALIBRATION_BATCHES, FINETUNE_LR, finetune

    base, size = demo_baseline(cfg).eval(), MODELS["demo_resnet18"]
    setting = {"runtime": cfg.f1_runtime, "batch": cfg.f1_batch, "threads": cfg.threads}
    path = table_path(cfg, "demo_resnet18", cfg.f1_runtime, cfg.f1_batch)
    table = latency.profile(base, METHOD, size, table=path, **setting)
    row: dict[str, Any] = {"target": target, **setting, "baseline": baseline_source(cfg)}
    try:
        lat = decomp.plan(
            base, METHOD, input_size=size, target_latency=target, latency_table=table, **setting
        )
    except ValueError as exc:
        return {**row, "status": "infeasible", "message": str(exc)}
    ratio = lat.latency["measured"]["ratio"]  # the plan's model, measured paired
    macs_plan, macs_ratio, macs_target, steps = matched_macs_plan(base, size, ratio, setting)
    row["macs_search"] = steps
    tuned = {}
    for label, p in (("latency", lat), ("macs", macs_plan)):
        outcome = finetune(
            decomp.apply(base, p),
            bundle,
            epochs=cfg.finetune_epochs,
            lr=FINETUNE_LR,
            seed=0,
            train_subset=cfg.finetune_subset,
            calibrate_batches=CALIBRATION_BATCHES,
        )
        tuned[label] = outcome.model
        row[label] = {
            "plan": p.rank,
            "macs": count_macs(outcome.model, size),
            "f1_epoch0": outcome.history[0].get("val_f1"),
            "val_f1": outcome.best_val_f1,
            "test_f1": (outcome.test or {}).get("f1"),
        }
    row["latency"]["planned_ratio"], row["macs"]["planned_ratio"] = ratio, macs_ratio
    for label, model in tuned.items():  # the two fine-tuned models, measured back to back
        measured = timing.paired_latency(base, model, size, rounds=15, **setting)
        row[label].update(measured_ratio=measured["ratio"], speedup_iqr=measured["speedup_iqr"])
    row["macs"]["target_macs"] = macs_target
    row["f1_gain"] = _diff(row["latency"]["test_f1"], row["macs"]["test_f1"])
    row["status"] = "ok"
    return row


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------- driver


class Run:
    """The results file, kept up to date row by row."""

    def __init__(self, cfg: Config, path: Path, fresh: bool) -> None:
        self.cfg, self.path, self.start = cfg, path, time.perf_counter()
        old = read_results(path) if path.exists() and not fresh else {}
        self.rows: list[dict] = old.get("rows", [])
        self.f1: list[dict] = old.get("f1", [])
        self.f1_baseline: dict | None = old.get("f1_baseline")
        self.alignment: list[dict] = old.get("alignment", [])

    def has(self, **key: Any) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.rows)

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.start > self.cfg.budget_s

    def save(self) -> None:
        config = {**dataclasses.asdict(self.cfg), "tables": shown_path(self.cfg.tables)}
        config["baseline"] = baseline_source(self.cfg)
        meta = make_meta(config, efficiency_goal=EFFICIENCY_GOAL)
        write_results(
            self.path,
            meta,
            self.rows,
            f1=self.f1,
            f1_baseline=self.f1_baseline,
            alignment=self.alignment,
        )
        write_text(self.path.with_suffix(".md"), render_markdown(read_results(self.path)))


def run(cfg: Config, path: Path, fresh: bool, log: Any) -> Run:
    state = Run(cfg, path, fresh)
    for runtime in cfg.runtimes:
        for batch in cfg.batches:
            done = any(r["runtime"] == runtime and r["batch"] == batch for r in state.alignment)
            if cfg.alignment and not done and not state.out_of_time():
                log(f"alignment: {runtime} batch {batch}")
                state.alignment += alignment_rows(cfg, runtime, batch)
                state.save()
    for name in cfg.models:
        for runtime in cfg.runtimes:
            for batch in cfg.batches:
                key = {"model": name, "runtime": runtime, "batch": batch, "threads": cfg.threads}
                todo = [t for t in cfg.targets if not state.has(**key, target=t)]
                if not todo or state.out_of_time():
                    continue
                log(f"{name} {runtime} batch {batch}: targets {todo}")
                state.rows += landing_rows(cfg, name, runtime, batch, todo)
                state.save()
    if cfg.f1:
        from decomp.evaluate import quick_scores
        from decomp.recipes import DEFAULT_DATA, load_bundle

        bundle = None
        for target in cfg.targets:
            if any(r["target"] == target for r in state.f1) or state.out_of_time():
                continue
            log(f"F1 at latency target {target}")
            bundle = bundle or load_bundle(DEFAULT_DATA, MODELS["demo_resnet18"], seed=0)
            if state.f1_baseline is None:
                scores = quick_scores(demo_baseline(cfg).eval(), bundle)
                state.f1_baseline = {"source": baseline_source(cfg), **scores}
            state.f1.append(f1_row(cfg, target, bundle))
            state.save()
    state.save()
    return state


# --------------------------------------------------------------------------- report


def _x(v: float) -> str:
    return f"{v:.2f}x"


COLUMNS = [
    Column("model"),
    Column("runtime"),
    Column("batch"),
    Column("target"),
    Column("landing", "measured / target", ".3f"),
    Column("speedup", "speed-up", _x),
    Column("speedup_iqr", "IQR", lambda v: f"{v[0]:.2f}-{v[1]:.2f}"),
    Column("macs_cut", "MACs cut", _x),
    Column("efficiency", "efficiency", ".2f"),
    Column("eager_speedup", "eager speed-up", _x),
    Column("eager_efficiency", "eager eff.", ".2f"),
    Column("error", "output error", ".3f"),
    Column("factorized", "layers"),
    Column("not_faster", "not faster"),
    Column("profile_s", "profile s", ".0f"),
    Column("status"),
]


def _num(x: float) -> str:
    """``1.0``, ``0.85``: at least one decimal."""
    return f"{x:.1f}" if x == round(x, 1) else f"{x:g}"


def _window() -> str:
    """``0.85-1.0``: :data:`LANDING_WINDOW` as text."""
    return "-".join(_num(x) for x in LANDING_WINDOW)


def _landed(row: Mapping[str, Any]) -> bool:
    return LANDING_WINDOW[0] <= row["landing"] <= LANDING_WINDOW[1]


def _name(row: Mapping[str, Any]) -> str:
    return f"{row['model']} {row['runtime']} b{row['batch']} at {row['target']:g}"


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else None


def summary_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per runtime, batch and target (over the models): how many landed inside
    :data:`LANDING_WINDOW`, the landing range, median speed-up, MACs cut and efficiency."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["runtime"], row["batch"], row["target"]), []).append(row)
    order = {name: i for i, name in enumerate(RUNTIMES)}
    out = []
    for (runtime, batch, target), group in sorted(
        groups.items(),
        key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][0], kv[0][1], -kv[0][2]),
    ):
        ok = [r for r in group if r["status"] == "ok"]
        entry: dict[str, Any] = {"runtime": runtime, "batch": batch, "target": target}
        entry |= {"models": len(ok), "infeasible": len(group) - len(ok)}
        if ok:
            landings = [r["landing"] for r in ok]
            entry |= {
                "landed": sum(_landed(r) for r in ok),
                "landing_range": [min(landings), max(landings)],
                "speedup": _median([r["speedup"] for r in ok]),
                "macs_cut": _median([r["macs_cut"] for r in ok]),
                "efficiency": _median([r["efficiency"] for r in ok]),
                "efficiency_min": min(r["efficiency"] for r in ok),
                "eager_efficiency": _median([r.get("eager_efficiency") for r in ok]),
            }
        out.append(entry)
    return out


SUMMARY_COLUMNS = [
    Column("runtime"),
    Column("batch"),
    Column("target"),
    Column("models", "models"),
    Column("landed", f"landed in {_window()}"),
    Column("landing_range", "measured / target", lambda v: f"{v[0]:.2f}-{v[1]:.2f}"),
    Column("speedup", "median speed-up", _x),
    Column("macs_cut", "median MACs cut", _x),
    Column("efficiency", "median efficiency", ".2f"),
    Column("efficiency_min", "lowest efficiency", ".2f"),
    Column("eager_efficiency", "median eager eff.", ".2f"),
    Column("infeasible", "below the floor"),
]


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """The verdicts, as markdown bullets: landing inside :data:`LANDING_WINDOW`, the efficiency
    goal, targets below the floor, and the F1 of a latency budget against a MACs budget at the
    same measured latency."""
    rows = result.get("rows") or []
    ok = [r for r in rows if r["status"] == "ok"]
    low, high = LANDING_WINDOW
    lines = []
    if ok:
        out = [r for r in ok if not _landed(r)]
        text = (
            f"- Landing (measured latency / target) inside {_window()}: "
            f"{len(ok) - len(out)} of {len(ok)} rows"
        )
        if out:
            text += "; outside: " + ", ".join(f"{_name(r)} ({r['landing']:.3f})" for r in out)
            text += f" (below {_num(low)}: faster than asked; above {_num(high)}: slower)"
        lines.append(text + ".")
    goal = [r for r in ok if r["runtime"] == GOAL_RUNTIME and r["target"] == GOAL_TARGET]
    if goal:
        short = [r for r in goal if r["efficiency"] < EFFICIENCY_GOAL]
        text = (
            f"- Efficiency goal (speed-up / MACs cut >= {EFFICIENCY_GOAL:g} under {GOAL_RUNTIME} "
            f"at target {GOAL_TARGET:g}): met by {len(goal) - len(short)} of {len(goal)} rows"
        )
        if short:
            text += "; short: " + ", ".join(f"{_name(r)} ({r['efficiency']:.2f})" for r in short)
        lines.append(text + ".")
    else:
        lines.append(f"- Efficiency goal: no {GOAL_RUNTIME} row at target {GOAL_TARGET:g} yet.")
    infeasible = [r for r in rows if r["status"] != "ok"]
    if infeasible:
        lines.append(
            "- Below the floor (no plan): " + ", ".join(_name(r) for r in infeasible) + "."
        )
    lines.append(f1_line(result))
    return lines


def f1_line(result: Mapping[str, Any]) -> str:
    """The F1 of a latency budget against a MACs budget at the same measured latency."""
    f1 = result.get("f1") or []
    if not f1:
        return "- F1 at equal measured latency: no rows yet."
    base = result.get("f1_baseline") or {}
    setting = next((r for r in f1 if r.get("runtime")), {})
    head = "- F1 at equal measured latency (demo resnet18"
    if setting:
        head += f", {setting['runtime']} batch {setting.get('batch')}"
    if base.get("f1") is not None:
        head += f"; baseline test F1 {base['f1']:.4f}"
    parts = []
    for r in f1:
        if r["status"] != "ok":
            parts.append(f"target {r['target']:g}: {r['status']}")
            continue
        lat, macs = r["latency"], r["macs"]
        gain = _diff(lat.get("test_f1"), macs.get("test_f1"))
        points = None if gain is None else 100 * gain
        parts.append(
            f"target {r['target']:g}: latency budget {_f(lat.get('test_f1'), '.4f')} against "
            f"MACs budget {_f(macs.get('test_f1'), '.4f')} ({_f(points, '+.2f')} "
            f"points; fine-tuned, they measure {_f(lat.get('measured_ratio'), '.3f')} and "
            f"{_f(macs.get('measured_ratio'), '.3f')} of the original's latency)"
        )
    return head + "): " + "; ".join(parts) + "."


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    parts = [
        "# Latency budgets\n",
        render_meta(result["meta"]),
        "\nlanding = measured latency (paired with the original, median over interleaved "
        "rounds) / target; efficiency = speed-up / MACs cut (goal "
        f">= {EFFICIENCY_GOAL} under ONNX Runtime at 1/2); eager columns: the same ONNX "
        "Runtime-chosen model run in eager PyTorch.\n",
        "## Summary\n",
        render_table(summary_table(rows), SUMMARY_COLUMNS),
        *summary_lines(result),
        "\n## Every row\n",
        render_table(ok, COLUMNS),
    ]
    if result.get("alignment"):
        cols = [
            Column("runtime"),
            Column("batch"),
            Column("channels"),
            Column("size"),
            Column("align"),
            Column("free", "next multiple costs <= 5% more", ".0%"),
            Column("median_up_over_r", "median time ratio, next multiple / r", ".2f"),
        ]
        parts += [
            "\n## Rank alignment\n",
            "Tucker-2 of a 3x3 conv at ranks (r, r), r = 16..56, every rank timed; for each "
            "multiple a, how often rounding r up to the next multiple of a costs at most 5% "
            "more time (where it is free, a budget may as well take the larger rank).\n",
            render_table(result["alignment"], cols),
        ]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        cols = [
            Column("model"),
            Column("runtime"),
            Column("batch"),
            Column("target"),
            Column("message"),
        ]
        parts += ["\n## Targets below the floor\n", render_table(bad, cols)]
    if result.get("f1"):
        base = result.get("f1_baseline") or {}
        parts += [
            "\n## F1 at equal measured latency (demo resnet18, 32 px)\n",
            f"Baseline {base.get('source')}: test F1 {base.get('f1', float('nan')):.4f}. Each "
            "target's latency plan is matched by a MACs budget whose model measures the same "
            "latency (bisection on target_macs); both are factorized, batch-norm calibrated and "
            "fine-tuned identically.\n",
            _f1_table(result),
        ]
    return "\n".join(parts)


def _f1_table(result: dict[str, Any]) -> str:
    flat = []
    for r in result["f1"]:
        if r["status"] != "ok":
            flat.append({"target": r["target"], "status": r["status"]})
            continue
        for label in ("latency", "macs"):
            m = r[label]
            flat.append(
                {
                    "target": r["target"],
                    "budget": label,
                    "plan": m["plan"],
                    "planned": m.get("planned_ratio"),
                    "ratio": m["measured_ratio"],
                    "macs": m["macs"],
                    "f1_epoch0": m["f1_epoch0"],
                    "test_f1": m["test_f1"],
                    "status": r["status"],
                }
            )
    cols = [
        Column("target"),
        Column("budget"),
        Column("plan"),
        Column("planned", "latency / original, matched", ".3f"),
        Column("ratio", "after fine-tuning", ".3f"),
        Column("macs", "MACs", ",d"),
        Column("f1_epoch0", "val F1 after BN calibration", ".4f"),
        Column("test_f1", "test F1 after fine-tune", ".4f"),
        Column("status"),
    ]
    return render_table(flat, cols)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (shared machine: 1)")
    p.add_argument("--budget-s", type=float, default=5400.0, help="stop starting rows after this")
    p.add_argument("--no-f1", dest="f1", action="store_false", help="skip the F1 comparison")
    p.add_argument(
        "--no-alignment",
        dest="alignment",
        action="store_false",
        help="skip timing ranks that are and are not multiples of 4, 8, 16, 32",
    )
    p.add_argument("--f1-runtime", choices=RUNTIMES, default="onnxruntime")
    p.add_argument("--f1-batch", type=int, default=1)
    p.add_argument("--baseline", default=None, help="trained demo resnet18 (a decomp file)")
    p.add_argument("--baseline-epochs", type=int, default=4, help="when one is trained here")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-subset", type=int, default=20000, help="training images (0: all)")
    p.add_argument("--tables", default=str(WORK_DIR / "tables"), help="latency tables folder")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "latency.json")
    p.add_argument("--fresh", action="store_true", help="ignore the rows already written")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(
        models=args.models,
        runtimes=args.runtimes,
        batches=args.batches,
        targets=args.targets,
        threads=args.threads,
        budget_s=args.budget_s,
        f1=args.f1,
        alignment=args.alignment,
        f1_runtime=args.f1_runtime,
        f1_batch=args.f1_batch,
        baseline=args.baseline,
        baseline_epochs=args.baseline_epochs,
        finetune_epochs=args.finetune_epochs,
        finetune_subset=args.finetune_subset or None,
        tables=args.tables,
    )
    torch.set_num_threads(cfg.threads)
    state = run(cfg, args.output, args.fresh, lambda text: print(text, file=sys.stderr, flush=True))
    print(f"wrote {shown_path(args.output)}: {len(state.rows)} rows, {len(state.f1)} F1 rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
