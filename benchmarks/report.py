"""The README's results section, rendered from the benchmark results files.

README.md's section "Results measured here" holds, between the lines ``<!-- results:begin -->``
and ``<!-- results:end -->``, a summary of whatever exists of

- ``demo.json`` (``make demo``): the baseline and the decomposed model, before and after BN
  calibration and fine-tuning;
- ``tucker_speed.json`` (``make bench-tucker``): Tucker-2 totals per method and the verdict;
- ``cp_speed.json`` (``make bench-cp``): CP-ALS against tensorly's parafac per model (time,
  error gaps, peak memory), the verdict, the memory and command-line limits, and what the file
  lacks yet;
- ``speed.json`` (``make bench-speed``): decomposition time, peak memory, MACs cut and CPU
  latency speed-ups per model and method, against the latency-efficiency goal;
- ``latency.json`` (``make bench-latency``): latency targets per runtime, batch and target
  (landing, speed-up, MACs cut, efficiency), the landing, efficiency and floor lines, the F1 at
  equal measured latency, and the rows not measured yet;
- ``quality.json`` (``make bench-quality``): baselines, the goal and budget lines, the budget
  comparison and the Pareto plot;
- ``pretrained.json`` (``make bench-pretrained``): top-1 agreement and output TV of
  weights-fit against outputs-fit per pretrained network and MACs target, before fine-tuning.

in ``benchmarks/results/``. A file that is missing gives one "not run yet" line. Each subsection
names its file, when and where it ran (from the file's ``meta``) and links the full markdown
report beside it. Only the text between the markers is rewritten (atomically); the rest of the
README is left byte for byte. The section is a pure function of the files, so ``--check`` can tell
whether the README is out of date.

Usage (from the repository root)::

    python -m benchmarks.report            # rewrite README.md between the markers (make report)
    python -m benchmarks.report --check    # exit 1 when README.md is out of date, else 0
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (  # noqa: E402
    bench_cp,
    bench_latency,
    bench_pretrained,
    bench_quality,
    bench_speed,
    bench_tucker,
)
from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    Column,
    read_results,
    render_table,
    shown_path,
    write_text,
)

README = REPO / "README.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
METHOD_NAMES = {"tucker": "Tucker-2", "cp": "CP", "svd": "SVD", "auto": "auto"}


class MarkerError(ValueError):
    """The README lacks the two marker lines, has them more than once, or in the wrong order."""


@dataclass(frozen=True)
class Context:
    """Where the results are and where the README is (links are relative to the README)."""

    results_dir: Path
    readme: Path

    def link(self, name: str) -> str:
        """``name`` in the results directory, as a path relative to the README's folder."""
        target = os.path.relpath(self.results_dir / name, self.readme.parent)
        return Path(target).as_posix()

    def exists(self, name: str) -> bool:
        return (self.results_dir / name).is_file()


# --------------------------------------------------------------------------- shared lines


def _when(timestamp: str | None) -> str | None:
    """``2026-11-29 03:11 UTC`` from an ISO timestamp; the text as given if it does not parse."""
    if not timestamp:
        return None
    try:
        stamp = _dt.datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if stamp.tzinfo is None:
        return f"{stamp:%Y-%m-%d %H:%M}"
    return f"{stamp.astimezone(_dt.UTC):%Y-%m-%d %H:%M} UTC"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _where(machine: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(what is known, what is not) of: CPU name, CPU and thread counts, GPU, load at start."""
    known, unknown = [], []
    if machine.get("cpu"):
        known.append(machine["cpu"])
    else:
        unknown.append("CPU model")
    cpus = machine.get("cpus_usable") or machine.get("cpu_count")
    if cpus:
        known.append(_plural(cpus, "CPU"))
    if machine.get("torch_threads"):
        known.append(_plural(machine["torch_threads"], "torch thread"))
    gpu = machine.get("cuda") or (machine.get("cuda_available") and machine.get("device_name"))
    if gpu:
        known.append(f"GPU {gpu}")
    load = machine.get("load_average")
    if load:
        known.append("load " + " / ".join(f"{x:g}" for x in load))
    else:
        unknown.append("load")
    return known, unknown


def provenance(meta: Mapping[str, Any], ctx: Context, name: str, extra: str = "") -> str:
    """One line: the source file, when and where it ran, and a link to its markdown report."""
    when, commit = _when(meta.get("timestamp")), meta.get("git_commit")
    known, unknown = _where(meta.get("machine") or {})
    if when is None:
        unknown.insert(0, "date")
    line = f"From [`{ctx.link(name)}`]({ctx.link(name)}): run"
    line += (f" {when}" if when else "") + (f" (commit {commit[:7]})" if commit else "")
    line += (" on " + ", ".join(known) if known else "") + (f"; {extra}" if extra else "")
    if unknown:
        line += "; not recorded: " + ", ".join(unknown)
    report = Path(name).with_suffix(".md").name
    if ctx.exists(report):
        line += f"; full report [`{report}`]({ctx.link(report)})"
    return line + "."


def not_run(target: str) -> str:
    """The line that stands for a results file that does not exist yet."""
    return f"not run yet: `make {target}`\n"


def _image(ctx: Context, name: str, alt: str) -> list[str]:
    """A markdown image of ``name`` when the file exists, else nothing."""
    return [f"![{alt}]({ctx.link(name)})", ""] if ctx.exists(name) else []


def _keep(columns: Sequence[Column], keys: Sequence[str]) -> list[Column]:
    """The columns named by ``keys``, in the order of ``keys`` (reusing headers and formats)."""
    by_key = {c.key: c for c in columns}
    return [by_key[k] for k in keys if k in by_key]


# --------------------------------------------------------------------------- sections


DEMO_COLUMNS = [
    Column("label", "model"),
    Column("f1", "macro F1 (test)", ".4f"),
    Column("macs", "MACs (thop)", ",d"),
    Column("macs_competition", "MACs (ptflops)", ",d"),
    Column("params", "params", ",d"),
    Column("competition_score", "competition score", ".3f"),
]


def demo_section(result: Mapping[str, Any], ctx: Context) -> list[str]:
    """The ``make demo`` run: baseline, decomposed (before / after BN calibration), fine-tuned."""
    config, base = result.get("config", {}), result["baseline"]
    dec, tuned = result.get("decomposed"), result.get("finetuned")
    arch = str(config.get("arch", "model")).rsplit(":", 1)[-1]
    rows: list[dict[str, Any]] = [
        {**base, "label": f"{arch} baseline, {_plural(config.get('epochs', 0), 'epoch')}"}
    ]
    if dec:
        method = METHOD_NAMES.get(config.get("method"), config.get("method"))
        sizes = {k: dec.get(k) for k in ("macs", "macs_competition", "params")}
        budget = config.get("target_macs")
        ranks = f"MACs budget {budget:g}" if budget else f"`{config.get('rank')}`"
        rows.append(
            {
                **sizes,
                "label": f"{method}, {ranks}, before BN calibration",
                "f1": dec.get("f1_before_calibration"),
            }
        )
        batches = dec.get("calibration_batches", config.get("calibration_batches"))
        label = f"the same after BN calibration ({batches} batches, no training)"
        rows.append({**dec, "label": label})
    if tuned:
        epochs = _plural(config.get("finetune_epochs", 0), "epoch")
        rows.append({**tuned, "label": f"after {epochs} of distillation"})
    total = result.get("timings", {}).get("total")
    machine = result.get("machine", {})
    meta = {"machine": machine, "timestamp": machine.get("timestamp"), **result.get("meta", {})}
    extra = f"total wall time {total / 60:.1f} min" if total else ""
    if result.get("baseline", {}).get("reused"):
        extra += " (baseline reused from an earlier run)"
    if result.get("status") not in (None, "done"):
        extra = f"status {result['status']}" + (f", {extra}" if extra else "")
    lines = [provenance(meta, ctx, "demo.json", extra), "", render_table(rows, DEMO_COLUMNS)]
    summary = result.get("summary", {})
    if tuned and summary.get("macs_ratio") and summary.get("params_ratio"):
        drop = 100 * summary["f1_drop_after_finetune"]
        side = "*above*" if drop < 0 else "below"
        lines += [
            f"{1 / summary['macs_ratio']:.1f}x fewer MACs and {1 / summary['params_ratio']:.1f}x "
            f"fewer parameters, with macro F1 {abs(drop):.2f} points {side} the baseline after "
            "fine-tuning.",
            "",
        ]
    targets = summary.get("targets") or {}
    if targets:
        named = [
            f"{k.replace('_', ' ').replace('f1', 'F1').replace('macs', 'MACs')}: "
            + ("met" if v else "**not met**")
            for k, v in targets.items()
        ]
        lines += ["Demo targets: " + "; ".join(named) + ".", ""]
    return lines + _image(ctx, "demo_f1_vs_macs.png", "macro F1 against MACs, demo")


def tucker_section(result: Mapping[str, Any], ctx: Context) -> list[str]:
    """``bench_tucker``: fastest totals per method, ratio to decomp, errors, the verdict."""
    summary = result["summary"]
    keys = ("method", "total_s", "time_vs_decomp", "mean_rel_error", "max_rel_error")
    extra = f"{summary.get('n_layers', len(result.get('rows', [])))} layers"
    return [
        provenance(result.get("meta", {}), ctx, "tucker_speed.json", extra),
        "",
        render_table(summary["methods"], _keep(bench_tucker.METHOD_COLUMNS, keys)),
        bench_tucker.verdict_line(summary),
        "",
    ]


def _not_yet(missing: Sequence[str]) -> list[str]:
    """The line naming what a partial results file lacks (nothing when it lacks nothing)."""
    return ["Not in this file yet: " + "; ".join(missing) + ".", ""] if missing else []


def _row_span(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows written 2026-12-01 09:10 to 11:27 UTC`` from the rows' timestamps, if they differ."""
    stamps = sorted(r["timestamp"] for r in rows if r.get("timestamp"))
    if not stamps or stamps[0] == stamps[-1]:
        return ""
    first, last = _when(stamps[0]) or stamps[0], _when(stamps[-1]) or stamps[-1]
    if first[:10] == last[:10]:
        last = last[11:]
    return f"rows written {first.removesuffix(' UTC')} to {last}"


CP_KEYS = (
    "model", "n_layers", "n_skipped", "n_failed", "decomp_s", "tensorly_s", "speedup",
    "mean_err_gap_rel", "worst_err_gap_rel", "decomp_peak_mb", "tensorly_peak_mb", "meets_target",
)  # fmt: skip


def cp_section(result: Mapping[str, Any], ctx: Context) -> list[str]:
    """``bench_cp``: per model (all specs) and overall, decomp's CP-ALS against tensorly's
    parafac; the verdict, the memory and command-line limits; what the file lacks yet."""
    rows = result.get("rows") or []
    totals = [s for s in result.get("summary") or [] if s.get("spec") == "all"]
    compared = sum(r.get("status") == "ok" for r in rows)
    skipped = [r for r in rows if r.get("status") == "skipped"]
    extra = f"{_plural(compared, 'layer fit')} compared, {len(skipped)} skipped at rank 0"
    if skipped:
        extra += " (" + ", ".join(dict.fromkeys(str(r.get("spec")) for r in skipped)) + ")"
    if span := _row_span(rows):
        extra += f", {span}"
    seen = {r["model"] for r in rows}
    missing = [f"{m} (no layer measured)" for m in bench_cp.MODELS if m not in seen]
    if not result.get("threads"):
        missing.append("the thread-policy timings")
    return [
        provenance(result.get("meta", {}), ctx, "cp_speed.json", extra),
        "",
        render_table(totals, _keep(bench_cp.SUMMARY_COLUMNS, CP_KEYS))
        if totals
        else "No layer compared yet.\n",
        bench_cp.verdict_line(result),
        "",
        bench_cp.limits_line(result),
        "",
        *_not_yet(missing),
    ]


def _latency_missing(result: Mapping[str, Any]) -> list[str]:
    """Model, runtime and batch of a full run (the bench's defaults) lacking a target's row."""
    rows = result.get("rows") or []
    have = {(r["model"], r["runtime"], r["batch"], r["target"]) for r in rows}
    missing = []
    for model in bench_latency.MODELS:
        for runtime in bench_latency.RUNTIMES:
            for batch in bench_latency.BATCHES:
                targets = [
                    t for t in bench_latency.TARGETS if (model, runtime, batch, t) not in have
                ]
                if targets:
                    shown = ", ".join(f"{t:g}" for t in targets)
                    missing.append(f"{model} {runtime} b{batch} at {shown}")
    return missing


def latency_section(result: Mapping[str, Any], ctx: Context) -> list[str]:
    """``bench_latency``: per runtime, batch and target, landing and efficiency; the landing,
    efficiency-goal, floor and F1-at-equal-latency lines; the rows not measured yet."""
    rows = result.get("rows") or []
    table = bench_latency.summary_table(rows)
    ok = sum(r.get("status") == "ok" for r in rows)
    extra = f"{_plural(ok, 'planned row')}, {len(rows) - ok} below the floor"
    extra += f", {_plural(len(result.get('f1') or []), 'F1 row')}"
    missing = _latency_missing(result)
    if not result.get("f1"):
        missing.append("the F1 comparison")
    return [
        provenance(result.get("meta", {}), ctx, "latency.json", extra),
        "",
        render_table(table, bench_latency.SUMMARY_COLUMNS) if table else "No rows yet.\n",
        *bench_latency.summary_lines(result),
        "",
        *_not_yet(missing),
    ]


def pretrained_section(result: Mapping[str, Any], ctx: Context) -> list[str]:
    """``bench_pretrained``: per network and MACs target, weights-fit against outputs-fit
    (top-1 agreement with the original and output TV, before fine-tuning), the lines per case."""
    rows = result.get("rows") or []
    images = {r["case"]: r.get("images") for r in rows if r.get("variant") == "original"}
    extra = ", ".join(f"{c} ({n} images)" if n else c for c, n in images.items())
    table = bench_pretrained.fit_table(rows)
    config = result.get("meta", {}).get("config", {})
    columns = bench_pretrained.fit_columns(bench_pretrained.variant_names(config))
    seen = {r["case"] for r in rows}
    missing = [c for c in bench_pretrained.CASES if c not in seen]
    return [
        provenance(result.get("meta", {}), ctx, "pretrained.json", extra),
        "",
        render_table(table, columns) if table else "No compressed rows yet.\n",
        *bench_pretrained.summary_lines(result),
        "",
        *_not_yet(missing),
    ]


def _yes_no(value: Any) -> str:
    return "yes" if value else "no"


def speed_section(result: Mapping[str, Any], ctx: Context) -> list[str]:
    """``bench_speed``: per model and method, cost of the decomposition and CPU speed-ups."""
    meta = result.get("meta", {})
    batches = meta.get("config", {}).get("batch_sizes") or [1, 64]
    goal = meta.get("latency_goal", bench_speed.LATENCY_GOAL)
    keys = ["model", "method", "status", "decompose_s", "peak_delta_mb", "macs_reduction"]
    keys += [f"latency_speedup_b{b}" for b in batches]
    keys += [f"latency_efficiency_b{b}" for b in batches]
    columns = _keep(bench_speed.row_columns(batches), keys)
    columns += [Column("meets_latency_goal", f"meets {goal:g}", _yes_no), Column("note")]
    rows = [r for r in result.get("rows", []) if r.get("method") != "original"]
    judged = [r for r in rows if r.get("meets_latency_goal") is not None]
    met = sum(bool(r["meets_latency_goal"]) for r in judged)
    return [
        provenance(meta, ctx, "speed.json"),
        "",
        render_table(rows, columns),
        f"Latency goal: speed-up / MACs cut >= {goal:g} at batch "
        + " and ".join(str(b) for b in batches)
        + f"; met by {met} of {len(judged)} rows.",
        "",
    ]


def quality_section(result: Mapping[str, Any], ctx: Context) -> list[str]:
    """``bench_quality``: baselines, the goal and comparison lines, CPU time and load, the
    staged, budget and fit tables, the Pareto plot."""
    rows = result.get("rows", [])
    ok = sum(r.get("status") == "ok" for r in rows)
    extra = f"{_plural(len(rows), 'row')}, {ok} ok"
    budget = bench_quality.budget_table(rows)
    staged = bench_quality.staged_table(rows)
    fits = [e for e in budget if "weights_f1" in e]
    return [
        provenance(result.get("meta", {}), ctx, "quality.json", extra),
        "",
        render_table(result.get("baselines", []), bench_quality.BASELINE_COLUMNS),
        *bench_quality.summary_lines(result),
        "",
        bench_quality.run_line(result),
        "",
        *([render_table(staged, bench_quality.STAGED_COLUMNS)] if staged else []),
        render_table(budget, bench_quality.BUDGET_COLUMNS)
        if budget
        else "No budgeted (target-macs) rows yet.\n",
        *([render_table(fits, bench_quality.FIT_COLUMNS)] if fits else []),
        *_image(ctx, "quality_pareto.png", "macro F1 against MACs"),
    ]


Renderer = Callable[[Mapping[str, Any], Context], list[str]]
SECTIONS: list[tuple[str, str, str, Renderer]] = [
    ("Demo: ResNet-18 on Fashion-MNIST", "demo.json", "demo", demo_section),
    ("Tucker-2 speed against tensorly and tensorly-torch", "tucker_speed.json", "bench-tucker",
     tucker_section),
    ("CP-ALS speed against tensorly's parafac", "cp_speed.json", "bench-cp", cp_section),
    ("Decomposition cost and CPU latency", "speed.json", "bench-speed", speed_section),
    ("Latency targets: landing, efficiency, F1 at equal latency", "latency.json",
     "bench-latency", latency_section),
    ("Macro F1 against MACs", "quality.json", "bench-quality", quality_section),
    ("Pretrained networks before fine-tuning: weights-fit against outputs-fit",
     "pretrained.json", "bench-pretrained", pretrained_section),
]  # fmt: skip
"""(heading, results file, make target, renderer) per subsection, in README order."""


def render_section(results_dir: Path = RESULTS_DIR, readme: Path = README) -> str:
    """The text between the markers, from whatever results files exist in ``results_dir``."""
    ctx = Context(Path(results_dir), Path(readme))
    parts = [
        "Generated by `make report` (`python -m benchmarks.report`) from "
        f"`{ctx.link('*.json')}`; do not edit by hand.",
        "",
    ]
    for heading, name, target, render in SECTIONS:
        parts += [f"### {heading} (`make {target}`)", ""]
        path = ctx.results_dir / name
        if not path.is_file():
            parts += [not_run(target)]
            continue
        try:
            result = read_results(path)
        except ValueError as exc:
            raise ValueError(f"{shown_path(path)} is not valid JSON: {exc}") from exc
        parts += render(result, ctx)
    text = "\n".join(parts).rstrip("\n") + "\n"
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.replace(str(REPO) + os.sep, "")  # no folder of the machine that wrote a file


# --------------------------------------------------------------------------- README


def _marker_span(text: str, name: str = "README") -> tuple[int, int]:
    """Offsets of the text between the begin marker's line and the end marker's line."""
    begins = list(re.finditer(rf"^{re.escape(BEGIN)}[ \t]*(\r?\n|$)", text, re.M))
    ends = list(re.finditer(rf"^{re.escape(END)}[ \t]*(\r?\n|$)", text, re.M))
    found = f"found {len(begins)} and {len(ends)}"
    if len(begins) == len(ends) == 1 and ends[0].start() < begins[0].end():
        found = "found them in the wrong order"
    elif len(begins) == len(ends) == 1:
        return begins[0].end(), ends[0].start()
    raise MarkerError(
        f"{name} needs one line {BEGIN} and, below it, one line {END} around the generated "
        f"results section ({found})"
    )


def replace_section(text: str, section: str, name: str = "README") -> str:
    """``text`` with the lines between the markers replaced by ``section``; the rest unchanged."""
    start, end = _marker_span(text, name)
    return text[:start] + "\n" + section.strip("\n") + "\n\n" + text[end:]


def update_readme(
    readme: Path = README, results_dir: Path = RESULTS_DIR, check: bool = False
) -> bool:
    """Render the section and put it into ``readme`` (unless ``check``).

    Returns:
        Whether the README differed from the rendered one (with ``check``: it is out of date).

    Raises:
        MarkerError: the README has not exactly one begin and one end marker line, in order.
    """
    readme = Path(readme)
    current = readme.read_bytes().decode("utf-8")  # bytes: line endings stay as they are
    new = replace_section(current, render_section(results_dir, readme), shown_path(readme))
    if new != current and not check:
        write_text(readme, new)
    return new != current


# --------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the README is out of date; write nothing"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--readme", type=Path, default=README, help="the README to update")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate (or with ``--check`` compare) the README's results section.

    Returns:
        0 when written or up to date, 1 when ``--check`` finds it out of date, 2 when the README
        has no (or broken) markers.
    """
    args = parse_args(argv)
    shown = shown_path(args.readme)
    try:
        changed = update_readme(args.readme, args.results, check=args.check)
    except MarkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if changed:
            print(
                f"{shown}: results section is out of date with {shown_path(args.results)}; "
                "run `make report`",
                file=sys.stderr,
            )
            return 1
        return 0
    print(f"{shown}: results section " + ("rewritten" if changed else "already up to date"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
