"""Rich tables and summary lines of the library's results: plans, inspect, evaluation, demo,
staged compression."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from decomp.evaluate import LATENCY_BATCHES
from decomp.metrics import competition_score
from decomp.plan import LayerPlan, Plan

if TYPE_CHECKING:
    from decomp.recipes import StagedResult, StageRecord


def num(n: int) -> str:
    """``1,234,567``."""
    return f"{n:,}"


def size_text(size: Any) -> str:
    """``3x32x32``."""
    return "x".join(map(str, size))


def _ratio(before: int, after: int) -> str:
    if after <= 0:
        return "n/a"
    return f"{before / after:.2f}x fewer, {100 * (after - before) / max(before, 1):+.1f}%"


# ----------------------------------------------------------------------------------- plans


def plan_table(p: Plan, title: str | None = None) -> Table:
    """The Plan as a table: layer, method, ranks, MACs and params before/after, skip reason."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("layer", no_wrap=True)
    table.add_column("method", no_wrap=True)
    table.add_column("ranks", no_wrap=True)
    for name in ("MACs before", "MACs after", "params before", "params after"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("skipped because", overflow="fold", ratio=1)
    if p.notes:
        table.caption, table.caption_justify = "\n".join(p.notes), "left"
    for lp in p.layers:
        style = None if lp.method else "dim"
        table.add_row(
            Text(lp.name),
            lp.method or "-",
            ", ".join(map(str, lp.ranks)) or "-",
            num(lp.macs_before),
            num(lp.macs_after),
            num(lp.params_before),
            num(lp.params_after),
            Text(lp.reason),
            style=style,
        )
    return table


def totals_line(macs: tuple[int, int], params: tuple[int, int], decomposed: int, total: int) -> str:
    """``3 of 5 layers decomposed; MACs a -> b (...); params c -> d (...)``."""
    return (
        f"{decomposed} of {total} layers decomposed; "
        f"MACs {num(macs[0])} -> {num(macs[1])} ({_ratio(*macs)}); "
        f"params {num(params[0])} -> {num(params[1])} ({_ratio(*params)})"
    )


# --------------------------------------------------------------------------------- inspect


def _cell(lp: LayerPlan) -> Text:
    if not lp.method:
        return Text(lp.short_reason, style="dim")
    change = 100 * (lp.macs_after - lp.macs_before) / max(lp.macs_before, 1)
    return Text(f"{'/'.join(map(str, lp.ranks))} {change:+.0f}%")


def inspect_table(plans: Mapping[str, Plan]) -> Table:
    """One row per layer, one column per method: its ranks and MACs change, or why it skips."""
    table = Table(
        header_style="bold",
        title_justify="left",
        title="per layer: ranks and MACs change, or why the method skips the layer",
    )
    table.add_column("layer", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("MACs", justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    for method in plans:
        table.add_column(method)
    rows = zip(*(p.layers for p in plans.values()), strict=True)
    for layers in rows:
        first = layers[0]
        table.add_row(
            Text(first.name),
            size_text(first.shape),
            num(first.macs_before),
            num(first.params_before),
            *(_cell(lp) for lp in layers),
        )
    return table


def methods_table(plans: Mapping[str, Plan]) -> Table:
    """Totals per method: layers factorized, MACs and params after."""
    table = Table(header_style="bold", title="totals per method", title_justify="left")
    for name in ("method", "layers", "MACs after", "MACs change", "params after"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method, p in plans.items():
        change = 100 * (p.macs_after - p.model_macs) / max(p.model_macs, 1)
        table.add_row(
            method,
            f"{len(p.decomposed)}/{len(p.layers)}",
            num(p.macs_after),
            f"{change:+.1f}%",
            num(p.params_after),
        )
    return table


# ------------------------------------------------------------------------ evaluate and demo


def _ms(metrics: Mapping[str, Any], device: str = "cpu", batch: int = 1) -> str:
    latency = metrics.get("latency") or {}
    row = latency.get(device, {}).get(f"batch_{batch}")
    return "-" if row is None else f"{row['median_ms']:.2f}"


def evaluation_table(metrics: Mapping[str, Any], title: str = "evaluation") -> Table:
    """A table of one :func:`decomp.evaluate.evaluate` result."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        (f"macro F1 ({metrics['split']})", f"{metrics['f1']:.4f}"),
        ("accuracy", f"{metrics['accuracy']:.4f}"),
        ("MACs (thop)", num(metrics["macs"])),
        ("MACs (ptflops, competition)", num(metrics["macs_competition"])),
        ("params", num(metrics["params"])),
        ("competition score", f"{metrics['competition_score']:.4f}"),
    ]
    for device in metrics.get("latency") or {}:
        for batch in LATENCY_BATCHES:
            rows.append((f"latency {device} batch {batch} (ms)", _ms(metrics, device, batch)))
    for batch, paired in (metrics.get("speedup") or {}).items():
        low, high = paired["speedup_iqr"]
        rows.append(
            (
                f"speed-up vs original, cpu {batch.replace('_', ' ')} (paired)",
                f"{paired['speedup']:.2f}x (IQR {low:.2f}-{high:.2f})",
            )
        )
    rows += [(f"F1 {name}", f"{f1:.4f}") for name, f1 in metrics["per_class_f1"].items()]
    for name, value in rows:
        table.add_row(name, value)
    return table


def demo_table(results: Mapping[str, Any]) -> Table:
    """A table comparing the demo's baseline, decomposed and fine-tuned models."""
    table = Table(title="decomp demo: before and after")
    for column in (
        "model",
        "F1",
        "accuracy",
        "MACs (thop)",
        "MACs (ptflops)",
        "params",
        "CPU ms (b1)",
        "CPU ms (b64)",
        "score",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    dec = results.get("decomposed")
    rows = [("baseline", results.get("baseline"))]
    if dec:
        before = {
            **dec,
            "f1": dec["f1_before_calibration"],
            "accuracy": dec["accuracy_before_calibration"],
        }
        rows += [("decomposed, before BN calibration", before), ("decomposed", dec)]
    rows.append(("fine-tuned", results.get("finetuned")))
    for name, entry in rows:
        if entry is None:
            continue
        score = competition_score(
            entry["macs_competition"], entry["f1"], **entry.get("score_constants", {})
        )
        table.add_row(
            name,
            f"{entry['f1']:.4f}",
            f"{entry['accuracy']:.4f}",
            num(entry["macs"]),
            num(entry["macs_competition"]),
            num(entry["params"]),
            _ms(entry, "cpu", 1),
            _ms(entry, "cpu", 64),
            f"{score:.4f}",
        )
    return table


# --------------------------------------------------------------------------------- compress


def _f1(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def staged_table(result: StagedResult) -> Table:
    """``decomp compress``: the original, then one row per stage (a
    :class:`~decomp.recipes.StagedResult`): budget, MACs, params, F1 after calibration and after
    fine-tuning (validation and test), the kept epoch, seconds."""
    table = Table(title="decomp compress: stage by stage", title_justify="left")
    for column in (
        "stage",
        "budget",
        "MACs",
        "MACs cut",
        "params",
        "val F1 calibrated",
        "test F1 calibrated",
        "val F1 tuned",
        "test F1 tuned",
        "kept epoch",
        "s",
    ):
        table.add_column(column, justify="left" if column == "stage" else "right")
    base = result.original
    blank = ("-", "-")
    table.add_row(
        "original", "1", num(base["macs"]), "1.00x", num(base["params"]), *blank,
        _f1(base["val_f1"]), _f1(base["f1"]), *blank,
    )  # fmt: skip
    for s in result.stages:
        table.add_row(
            f"{s.stage}/{len(result.budgets)}",
            f"{s.budget:.3g}",
            num(s.macs),
            f"{base['macs'] / s.macs:.2f}x",
            num(s.params),
            _f1(s.val_f1_calibrated),
            _f1(s.test_f1_calibrated),
            _f1(s.val_f1),
            _f1(s.test_f1),
            f"{s.best_epoch}/{s.epochs}",
            f"{s.seconds['total']:.0f}",
        )
    return table


def staged_stage_line(record: StageRecord) -> str:
    """One finished stage of ``decomp compress``, as it ends."""
    return (
        f"stage {record.stage}: {num(record.macs)} MACs (budget {record.budget:.3g}); test F1 "
        f"{_f1(record.test_f1_calibrated)} after calibration, {_f1(record.test_f1)} after "
        f"{record.epochs} epoch(s) of distillation; {record.seconds['total']:.0f} s"
    )


def staged_lines(result: StagedResult) -> list[str]:
    """What ``decomp compress`` did in all: MACs and test F1 from the original to the last
    stage, and the files."""
    base, last = result.original, result.stages[-1]
    lines = [
        f"MACs {num(base['macs'])} -> {num(last.macs)} ({base['macs'] / last.macs:.2f}x fewer); "
        f"test F1 {_f1(base['f1'])} -> {_f1(last.test_f1)}"
        + (
            f" ({100 * (last.test_f1 - base['f1']):+.2f} points)"
            if last.test_f1 is not None
            else ""
        )
    ]
    if result.resumed:
        lines.append(f"resumed from {result.state}")
    lines.append(f"wrote {result.output} (stage files beside it; state in {result.state})")
    return lines
