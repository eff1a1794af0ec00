"""What decomposition costs in macro F1 for what it saves in MACs, on baselines trained by decomp.

For each model (torchvision resnet18 and shufflenet_v2_x0_5, trained from scratch on
Fashion-MNIST at 3x32x32 with the recipe of :func:`decomp.recipes.train_baseline`, cached on
disk):

- a sweep of method (tucker, cp, svd, auto) x rank strategy (vbmf, vbmf:0.6, ratio:0.25,
  ratio:0.125, energy:0.9);
- budgeted rows, ``rank = target-macs:X`` with method auto, for X = 1/4, 1/8, 1/16 of the
  baseline's MACs from the spectra alone, and the same with each layer's measured output
  damage weighting its error (``target-macs+importance``); beside them, a uniform ``ratio:F``
  row and a weakened ``vbmf:WF`` row (method auto too) whose F or WF is found by bisection on
  :func:`decomp.plan.plan`'s MACs alone (no factorization, no data) so that their MACs equal
  the target-macs row's within 2 %;
- each decomposition then goes through batch-norm re-estimation (:func:`decomp.train.calibrate`,
  30 training batches, no gradient step) and every fine-tuning budget (0 and 1 epochs by default;
  distillation from the baseline, :func:`decomp.recipes.finetune`). Fine-tuning keeps the epoch
  with the best validation F1 (epoch 0 = the calibrated start); every F1 in a row is measured on
  the test split, every choice is made on the validation split.

A row: ``model, method, rank, baseline_f1, baseline_macs, baseline_params, macs, params,
f1_before_finetune, f1_after_calibration, f1, finetune_epochs, competition_score,
latency_cpu_b1_ms, latency_cpu_b64_ms, seconds`` and more (validation F1s, ptflops MACs, the
series it belongs to, notes). MACs are thop's count (``decomp.metrics.count_macs``), the one the
plan and the goals use; ``competition_score`` uses the organizers' ptflops count.

Baselines are cached as decomp files under ``runs/bench/<model>/baseline.pt`` (reused only when
their settings match, :func:`decomp.recipes.cached_baseline`); resnet18 reuses
``runs/demo/baseline.pt`` when the demo trained it with the same settings. The results file is
rewritten after every decomposition, and a later run with the same settings skips the rows it
already holds (``--fresh`` recomputes them), so a long run can be stopped and continued.

Writes ``quality.json``, ``quality.md`` and ``quality_pareto.png`` (``quality_tiny.*`` with
``--tiny``). Usage, from the repository root::

    python -m benchmarks.bench_quality                     # both models, the whole sweep (hours)
    python -m benchmarks.bench_quality --models resnet18 --finetune-epochs 0 1 3
    python -m benchmarks.bench_quality --tiny      # a small CNN on 512 images, about a minute
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    Column,
    apply_within_budget,
    make_meta,
    read_results,
    render_meta,
    render_table,
    shown_path,
    write_results,
    write_text,
)

logger = logging.getLogger(__name__)

MODEL_ARCHS = {
    "resnet18": "torchvision.models:resnet18",
    "mobilenet_v2": "torchvision.models:mobilenet_v2",
    "shufflenet_v2_x0_5": "torchvision.models:shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0": "torchvision.models:shufflenet_v2_x1_0",
    "small_cnn": "benchmarks.bench_quality:SmallNet",
}
MODELS = ("resnet18", "shufflenet_v2_x0_5")
BASELINE_EPOCHS = 12
"""The demo's recipe length when the bench was run (kept fixed here, so the rows stay reusable)."""
TINY_MODELS = ("small_cnn",)
METHODS = ("tucker", "cp", "svd", "auto")
RANKS = ("vbmf", "vbmf:0.6", "ratio:0.25", "ratio:0.125", "energy:0.9")
BUDGETS = (1 / 4, 1 / 8, 1 / 16)
BUDGET_METHOD = "auto"
IMPORTANCE_BATCHES = 4
"""Training batches on which the budgeted rows measure layer importance (decomp.plan.importance)."""
FINETUNE_EPOCHS = (0, 1)
GOAL_MODEL = "resnet18"
GOALS = ((4.0, 0.5), (8.0, 1.5))
"""(MACs reduction, most macro-F1 points lost) that must both hold for resnet18 (issue 5)."""

SWEEP = "sweep"
TARGET = "target-macs"
WEIGHTED = "target-macs+importance"
RATIO_EQ = "ratio@equal-macs"
VBMF_EQ = "vbmf@equal-macs"
SERIES = (SWEEP, TARGET, WEIGHTED, RATIO_EQ, VBMF_EQ)

ROW_KEYS = (
    "model",
    "method",
    "rank",
    "baseline_f1",
    "baseline_macs",
    "baseline_params",
    "macs",
    "params",
    "f1_before_finetune",
    "f1_after_calibration",
    "f1",
    "finetune_epochs",
    "competition_score",
    "latency_cpu_b1_ms",
    "latency_cpu_b64_ms",
    "seconds",
)
"""Every row carries these (issue 5 and issue 6)."""

_RESULT_FIELDS = (
    "data",
    "input_size",
    "epochs",
    "batch_size",
    "lr",
    "finetune_lr",
    "seed",
    "train_subset",
    "val_split",
    "test_subset",
    "calibration_batches",
    "cp_budget_s",
    "match_tolerance",
    "tiny",
)
"""The settings a row's numbers depend on: rows are reused only when these match."""


# --------------------------------------------------------------------------- the tiny model


class SmallNet(nn.Module):
    """The smoke test's model: conv-BN-ReLU everywhere (so that BN calibration matters), a
    residual block, a strided 1x1 conv (svd's and auto's) and a linear head; 32 px in."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()

        def unit(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(c_out))

        self.stem = unit(3, width, 3)
        self.down = unit(width, 2 * width, 3, stride=2)
        self.block1 = unit(2 * width, 2 * width, 3)
        self.block2 = unit(2 * width, 2 * width, 3)
        self.expand = unit(2 * width, 4 * width, 1, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.down(torch.relu(self.stem(x))))
        x = torch.relu(x + self.block2(torch.relu(self.block1(x))))
        return self.fc(torch.relu(self.expand(x)).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class Config:
    """What one run measures (plain data, stored in the results' meta)."""

    models: list[str]
    methods: list[str]
    ranks: list[str]
    budgets: list[float]
    finetune_epochs: list[int]
    data: str
    input_size: list[int]
    epochs: int
    batch_size: int
    lr: float
    finetune_lr: float
    seed: int
    train_subset: int | None
    val_split: float | int | None
    test_subset: int | None
    calibration_batches: int
    cp_budget_s: float
    match_tolerance: float
    tune_max_iter: int
    latency_repeats: int
    threads: int | None
    device: str | None
    cache_dir: str
    demo_baseline: str | None
    tiny: bool


def resume_key(config: Config) -> str:
    """A short hash of the settings that determine the rows' numbers."""
    values = {k: getattr(config, k) for k in _RESULT_FIELDS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Job:
    """One decomposition of one model, measured at every fine-tuning budget.

    ``spec`` is the rank spec of a sweep job; budgeted jobs have ``budget`` (a fraction of the
    baseline's MACs) instead, and their rank is decided when the plan is made.
    """

    model: str
    series: str
    method: str
    spec: str | None = None
    budget: float | None = None

    @property
    def key(self) -> str:
        return f"{self.model}|{self.series}|{self.method}|{self.spec or f'{self.budget:g}'}"

    @property
    def label(self) -> str:
        return f"{self.model}: {self.method} {self.spec or f'{self.series} {_fraction(self)}'}"


def _fraction(job: Job | float | None) -> str:
    """1/4 for 0.25 (the budgets are reciprocals of integers here), else the number."""
    value = job.budget if isinstance(job, Job) else job
    if value is None:
        return "-"
    inverse = 1 / value
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{value:g}"


def jobs_for(config: Config, model: str) -> list[Job]:
    """The sweep, then for each budget: target-macs (plain and weighted by measured damage),
    ratio and weakened vbmf at equal MACs."""
    jobs = [Job(model, SWEEP, m, spec=r) for m in config.methods for r in config.ranks]
    for budget in config.budgets:
        jobs += [Job(model, s, BUDGET_METHOD, budget=budget) for s in SERIES[1:]]
    return jobs


# --------------------------------------------------------------------------- data and baselines


def load_bundle(config: Config) -> Any:
    """The data bundle; with ``test_subset``, a seeded random part of the test split only."""
    from decomp.data import load_data, make_loader

    bundle = load_data(
        config.data,
        config.input_size,
        batch_size=config.batch_size,
        val_split=config.val_split,
        seed=config.seed,
        workers=0,
        train_subset=config.train_subset,
    )
    test = bundle.test_loader
    if config.test_subset is None or test is None or len(test.dataset) <= config.test_subset:
        return bundle
    generator = torch.Generator().manual_seed(config.seed)
    keep = torch.randperm(len(test.dataset), generator=generator)[: config.test_subset]
    subset = torch.utils.data.Subset(test.dataset, sorted(keep.tolist()))
    loader = make_loader(subset, config.batch_size, False, 0, config.seed)
    return dataclasses.replace(bundle, test_loader=loader)


def _demo_config(config: Config, model: str, output_dir: Path) -> Any:
    """The demo's baseline settings for ``model`` (the demo's cache logic reads them)."""
    from decomp.demo import DemoConfig

    return DemoConfig(
        output_dir=str(output_dir),
        epochs=config.epochs,
        data=config.data,
        arch=MODEL_ARCHS[model],
        input_size=tuple(config.input_size),
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        train_subset=config.train_subset,
        val_split=config.val_split,
        workers=0,
        device=config.device,
    )


def get_baseline(config: Config, model: str, bundle: Any, device: torch.device) -> tuple:
    """The trained baseline and where it came from: the demo's, this cache's, or trained now."""
    from decomp.demo import demo_baseline
    from decomp.recipes import baseline_config, cached_baseline

    if config.demo_baseline and model == "resnet18":
        demo = _demo_config(config, model, Path(config.demo_baseline).parent)
        fields = ("arch", "arch_kwargs", "data", "input_size", "epochs", "batch_size", "lr")
        key = baseline_config(
            *(getattr(demo, f) for f in fields), demo.seed, demo.train_subset, demo.val_split
        )
        found = cached_baseline(Path(config.demo_baseline), key, retrain=False)
        if found is not None:
            where = shown_path(config.demo_baseline)
            return found.to(device), f"reused {where} (the demo's; same settings)"
    cfg = _demo_config(config, model, Path(config.cache_dir) / model)
    net, reused = demo_baseline(cfg, bundle, device)
    where = shown_path(Path(cfg.output_dir) / "baseline.pt")
    return net, f"{'reused' if reused else 'trained'} {where}"


@dataclasses.dataclass
class ModelContext:
    """One model's baseline, its measurements and the data, shared by its jobs."""

    name: str
    config: Config
    bundle: Any
    baseline: nn.Module
    base: dict[str, Any]
    device: torch.device
    target_plans: dict[float, Any] = dataclasses.field(default_factory=dict)


def _latency_ms(metrics: Mapping[str, Any], batch: int) -> float | None:
    cpu = (metrics.get("latency") or {}).get("cpu") or {}
    entry = cpu.get(f"batch_{batch}")
    return None if entry is None else entry["median_ms"]


def measure_baseline(config: Config, model: str, bundle: Any, device: torch.device) -> ModelContext:
    """Train or load the baseline and measure it once (test F1, validation F1, costs)."""
    from decomp.checkpoint import model_meta
    from decomp.evaluate import evaluate, val_f1

    net, source = get_baseline(config, model, bundle, device)
    metrics = evaluate(net, bundle, latency=True, latency_repeats=config.latency_repeats)
    training = model_meta(net).get("extra", {}).get("training", {})
    epochs = len([h for h in training.get("history") or [] if h.get("epoch")])
    base = {
        "model": model,
        "arch": MODEL_ARCHS[model],
        "source": source,
        "f1": metrics["f1"],
        "val_f1": val_f1(net, bundle),
        "accuracy": metrics["accuracy"],
        "test_split": metrics["split"],
        "macs": metrics["macs"],
        "macs_competition": metrics["macs_competition"],
        "params": metrics["params"],
        "competition_score": metrics["competition_score"],
        "latency_cpu_b1_ms": _latency_ms(metrics, 1),
        "latency_cpu_b64_ms": _latency_ms(metrics, 64),
        "epochs": epochs or None,
        "best_epoch": training.get("best_epoch"),
        "train_seconds": training.get("seconds"),
        "train_seconds_per_epoch": training["seconds"] / epochs
        if epochs and training.get("seconds")
        else None,
    }
    return ModelContext(model, config, bundle, net.eval(), base, device)


# --------------------------------------------------------------------------- plans


def tune_to_macs(
    make: Callable[[float], Any],
    lo: float,
    hi: float,
    target: int,
    rising: bool,
    tolerance: float,
    max_iter: int,
) -> dict[str, Any]:
    """Bisect a rank parameter until the plan's MACs are within ``tolerance / 2`` of ``target``.

    Args:
        make: parameter -> Plan (the parameter is rounded to 4 decimals first).
        lo, hi: the bracket of the parameter.
        target: the MACs to match.
        rising: True when MACs grow with the parameter (ratio F), False when they fall (vbmf WF).
        tolerance: the accepted relative deviation; the search aims at half of it.
        max_iter: most plans to make.

    Returns:
        ``{"param", "plan", "deviation", "iterations"}`` for the closest plan seen.
    """
    best: dict[str, Any] | None = None
    for iteration in range(1, max_iter + 1):
        mid = round((lo + hi) / 2, 4)
        p = make(mid)
        deviation = p.macs_after / target - 1
        if best is None or abs(deviation) < abs(best["deviation"]):
            best = {"param": mid, "plan": p, "deviation": deviation}
        best["iterations"] = iteration
        if abs(deviation) <= tolerance / 2 or hi - lo < 2e-4:
            break
        if (deviation > 0) == rising:
            hi = mid
        else:
            lo = mid
    assert best is not None
    return best


def _target_plan(ctx: ModelContext, budget: float) -> Any:
    """The target-macs plan of a budget (cached: the equal-MACs series match its MACs)."""
    from decomp.plan import plan

    if budget not in ctx.target_plans:
        ctx.target_plans[budget] = plan(
            ctx.baseline, BUDGET_METHOD, input_size=ctx.config.input_size, target_macs=budget
        )
    return ctx.target_plans[budget]


def plan_job(ctx: ModelContext, job: Job) -> tuple[Any, dict[str, Any]]:
    """The job's Plan and what the row should say about how it was chosen."""
    from decomp.plan import plan

    size = ctx.config.input_size
    if job.series == SWEEP:
        return plan(ctx.baseline, job.method, job.spec, size), {}
    target = _target_plan(ctx, job.budget)
    if job.series == TARGET:
        return target, {}
    if job.series == WEIGHTED:
        weighted = plan(
            ctx.baseline,
            BUDGET_METHOD,
            input_size=size,
            target_macs=job.budget,
            data=ctx.bundle.train_loader,
            importance_batches=IMPORTANCE_BATCHES,
        )
        return weighted, {}
    family, lo, rising = ("ratio", 1e-3, True) if job.series == RATIO_EQ else ("vbmf", 0.0, False)
    start = time.perf_counter()
    found = tune_to_macs(
        lambda x: plan(ctx.baseline, job.method, f"{family}:{x:.4f}", size),
        lo,
        1.0,
        target.macs_after,
        rising,
        ctx.config.match_tolerance,
        ctx.config.tune_max_iter,
    )
    info = {
        "rank_param": found["param"],
        "plan_macs_vs_target": found["deviation"],
        "tune_iterations": found["iterations"],
        "tune_s": time.perf_counter() - start,
    }
    if abs(found["deviation"]) > ctx.config.match_tolerance:
        info["note"] = (
            f"{family} could not be tuned to the target-macs row's MACs within "
            f"{ctx.config.match_tolerance:.0%}: closest {found['deviation']:+.1%}"
        )
    return found["plan"], info


def apply_job(ctx: ModelContext, job: Job, p: Any) -> tuple[nn.Module, list[str]]:
    """The decomposed copy of the baseline; CP layer by layer within ``cp_budget_s``."""
    from decomp.plan import apply

    if job.method != "cp":
        return apply(ctx.baseline, p), []
    net = copy.deepcopy(ctx.baseline)
    done, failed, hit = apply_within_budget(net, p, ctx.config.cp_budget_s)
    notes = [f"CP failed on {f['layer']} (kept dense): {f['error']}" for f in failed]
    if hit:
        notes.append(
            f"CP time budget {ctx.config.cp_budget_s:g} s: {len(done)} of {len(p.decomposed)} "
            "planned layers factorized, in model order; the rest stay dense"
        )
    return net, notes


# --------------------------------------------------------------------------- measuring one job


def _test_f1(model: nn.Module, bundle: Any) -> float:
    from decomp.metrics import evaluate_model

    names = bundle.class_names
    loader = bundle.test_loader or bundle.val_loader
    return float(evaluate_model(model, loader, None, len(names), names)["f1"])


def _common_fields(ctx: ModelContext, job: Job, p: Any, info: Mapping[str, Any]) -> dict:
    base = ctx.base
    return {
        "model": job.model,
        "series": job.series,
        "job": job.key,
        "method": job.method,
        "rank": p.rank,
        "budget": job.budget,
        "budget_label": _fraction(job) if job.budget else None,
        "baseline_f1": base["f1"],
        "baseline_val_f1": base["val_f1"],
        "baseline_macs": base["macs"],
        "baseline_macs_competition": base["macs_competition"],
        "baseline_params": base["params"],
        "plan_macs": p.macs_after,
        "n_factorized": len(p.decomposed),
        **{k: v for k, v in info.items() if k != "note"},
    }


def decompose_and_calibrate(ctx: ModelContext, job: Job) -> tuple[nn.Module, dict[str, Any]]:
    """Plan, decompose, score before and after batch-norm re-estimation, measure the costs."""
    from decomp.batchnorm import calibrate
    from decomp.evaluate import evaluate, quick_scores, val_f1
    from decomp.seeding import seed_loader

    start = time.perf_counter()
    p, info = plan_job(ctx, job)
    net, notes = apply_job(ctx, job, p)
    net.to(ctx.device)
    decompose_s = time.perf_counter() - start
    before = quick_scores(net, ctx.bundle)
    start = time.perf_counter()
    seed_loader(ctx.bundle.train_loader, ctx.config.seed)
    calibrate(net, ctx.bundle.train_loader, batches=ctx.config.calibration_batches)
    calibrate_s = time.perf_counter() - start
    metrics = evaluate(net, ctx.bundle, latency=True, latency_repeats=ctx.config.latency_repeats)
    fields = _common_fields(ctx, job, p, info) | {
        "f1_before_finetune": before["f1"],
        "val_f1_before_finetune": before["val_f1"],
        "f1_after_calibration": metrics["f1"],
        "val_f1_after_calibration": val_f1(net, ctx.bundle),
        "macs": metrics["macs"],
        "macs_competition": metrics["macs_competition"],
        "params": metrics["params"],
        "macs_reduction": ctx.base["macs"] / metrics["macs"],
        "latency_cpu_b1_ms": _latency_ms(metrics, 1),
        "latency_cpu_b64_ms": _latency_ms(metrics, 64),
        "decompose_s": decompose_s,
        "calibrate_s": calibrate_s,
        "notes": [n for n in [info.get("note"), *notes] if n],
    }
    return net, fields


def finetuned_row(
    ctx: ModelContext, net: nn.Module, fields: Mapping[str, Any], epochs: int, shared_s: float
) -> dict[str, Any]:
    """The row for one fine-tuning budget (0: the calibrated model as it is)."""
    from decomp.metrics import competition_score
    from decomp.recipes import finetune

    row = dict(fields)
    start = time.perf_counter()
    if epochs == 0:
        f1, val_f1, best_epoch = (
            fields["f1_after_calibration"],
            fields["val_f1_after_calibration"],
            0,
        )
    else:
        outcome = finetune(
            copy.deepcopy(net),
            ctx.bundle,
            teacher=ctx.baseline,
            epochs=epochs,
            lr=ctx.config.finetune_lr,
            seed=ctx.config.seed,
            device=ctx.device,
            evaluate_test=False,
        )
        f1, val_f1 = _test_f1(outcome.model, ctx.bundle), outcome.best_val_f1
        best_epoch = outcome.best_epoch
        row["finetune_s"] = outcome.seconds
    row.update(
        finetune_epochs=epochs,
        best_epoch=best_epoch,
        f1=f1,
        val_f1=val_f1,
        f1_drop_points=100 * (ctx.base["f1"] - f1),
        competition_score=competition_score(row["macs_competition"], f1),
        seconds=shared_s + time.perf_counter() - start,
        status="ok",
        note="; ".join(row.pop("notes")) or None,
    )
    return row


def error_rows(ctx: ModelContext, job: Job, epochs: Iterable[int], exc: BaseException) -> list:
    """Rows that say a job failed, with every required key (numbers None)."""
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    logger.warning("%s failed: %s", job.label, message)
    return [
        {k: None for k in ROW_KEYS}
        | {
            "model": job.model,
            "series": job.series,
            "job": job.key,
            "method": job.method,
            "rank": job.spec or f"{job.series}:{job.budget:g}",
            "budget": job.budget,
            "budget_label": _fraction(job) if job.budget else None,
            "finetune_epochs": e,
            "status": "error",
            "note": message,
        }
        for e in epochs
    ]


def run_job(ctx: ModelContext, job: Job, epochs: Sequence[int]) -> list[dict[str, Any]]:
    """Every fine-tuning budget of one decomposition; a failure gives error rows, not a crash."""
    start = time.perf_counter()
    try:
        net, fields = decompose_and_calibrate(ctx, job)
        shared_s = time.perf_counter() - start
        return [finetuned_row(ctx, net, fields, e, shared_s) for e in epochs]
    except (ValueError, RuntimeError) as exc:  # CP divergence, a budget below the floor...
        return error_rows(ctx, job, epochs, exc)


# --------------------------------------------------------------------------- the run


def _row_key(row: Mapping[str, Any]) -> tuple[str, int]:
    return row["job"], int(row["finetune_epochs"])


class Runner:
    """Runs the jobs, keeps the rows (reusing those of an earlier run with the same settings)."""

    def __init__(
        self, config: Config, json_path: Path, fresh: bool, progress: Callable[[str, int], None]
    ) -> None:
        self.config, self.json_path, self.progress = config, json_path, progress
        self.key = resume_key(config)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.baselines: dict[str, dict[str, Any]] = {}
        self.reused = 0
        if not fresh and json_path.exists():
            self._load_previous()

    def _load_previous(self) -> None:
        try:
            old = read_results(self.json_path)
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s (%s); starting afresh", self.json_path, exc)
            return
        if old.get("meta", {}).get("resume_key") != self.key:
            logger.warning(
                "%s was written with other settings; its rows are replaced", self.json_path
            )
            return
        self.rows = {_row_key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
        self.baselines = {b["model"]: b for b in old.get("baselines", [])}

    def write(self) -> None:
        config = dataclasses.asdict(self.config)
        for key in ("cache_dir", "demo_baseline"):
            config[key] = config[key] and shown_path(config[key])
        meta = make_meta(
            config,
            resume_key=self.key,
            goals={"model": GOAL_MODEL, "reduction_and_points": [list(g) for g in GOALS]},
            score_constants=_score_constants(),
        )
        order = {m: i for i, m in enumerate(self.config.models)}
        rows = sorted(self.rows.values(), key=lambda r: order.get(r["model"], len(order)))
        baselines = [self.baselines[m] for m in self.config.models if m in self.baselines]
        baselines += [b for m, b in self.baselines.items() if m not in self.config.models]
        write_results(self.json_path, meta, rows, baselines=baselines, notes=_notes(self.config))

    def run_model(self, model: str, bundle: Any, device: torch.device) -> None:
        label = f"{model}: baseline (trained for {self.config.epochs} epochs unless cached)"
        self.progress(label, 0)
        ctx = measure_baseline(self.config, model, bundle, device)
        self.baselines[model] = ctx.base
        self.write()
        self.progress(label, 1)
        for job in jobs_for(self.config, model):
            self.progress(job.label, 0)
            todo = [e for e in self.config.finetune_epochs if (job.key, e) not in self.rows]
            self.reused += len(self.config.finetune_epochs) - len(todo)
            if todo:
                for row in run_job(ctx, job, todo):
                    self.rows[_row_key(row)] = row
                self.write()
            self.progress(job.label, 1)


def _score_constants() -> dict[str, float]:
    from decomp.metrics import BASELINE_F1, BASELINE_MACS

    return {"baseline_macs": BASELINE_MACS, "baseline_f1": BASELINE_F1}


def _notes(config: Config) -> list[str]:
    return [
        f"Data {config.data} at {tuple(config.input_size)}; baselines trained by decomp "
        f"({config.epochs} epochs, batch {config.batch_size}, one-cycle to lr {config.lr:g}); "
        f"F1 = macro F1 on the test split"
        + (f" (a seeded subset of {config.test_subset})" if config.test_subset else "")
        + "; every choice (fine-tuning epoch, the goal rows) by the validation split.",
        "MACs: thop (decomp.metrics.count_macs), batch 1, as the plan counts them; "
        "competition_score: the organizers' ptflops MACs and the published constants.",
        f"Batch-norm re-estimation: decomp.calibrate on {config.calibration_batches} "
        "training batches, no gradient step, before every fine-tuning. Fine-tuning: "
        f"decomp.recipes.finetune, distillation from the baseline, SGD, cosine, lr "
        f"{config.finetune_lr:g}; the best validation epoch is kept (epoch 0 = calibrated).",
        f"Budgeted rows (method {BUDGET_METHOD}): target-macs:X through decomp.plan's "
        "target_macs from the spectra alone; target-macs+importance also passes "
        f"{IMPORTANCE_BATCHES} training batches as data, so that each layer's error is weighted "
        "by its measured output damage (decomp.plan.importance); the ratio:F and vbmf:WF rows "
        "beside them have F / WF bisected on plan() MACs to within "
        f"{config.match_tolerance:.0%} of the target-macs row's MACs.",
        f"CP: planned layers are factorized in model order until {config.cp_budget_s:g} s "
        "have passed per decomposition; the rest stay dense and the row says so.",
        "Latency: decomp.metrics.measure_latency, median of "
        f"{config.latency_repeats} CPU passes at batch 1 and 64, on a machine that may be "
        "shared: compare within a run.",
    ]


# --------------------------------------------------------------------------- summary


def _ok(rows: Iterable[Mapping[str, Any]], model: str | None = None) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and (model is None or r["model"] == model)]


def _describe(row: Mapping[str, Any]) -> str:
    return (
        f"{row['method']} {row['rank']}, {row['finetune_epochs']} fine-tuning epochs: "
        f"{row['macs_reduction']:.2f}x fewer MACs, F1 {row['f1']:.4f} "
        f"({row['f1_drop_points']:+.2f} points lost)"
    )


def goal_line(rows: Sequence[Mapping[str, Any]], model: str, reduction: float, points: float):
    """Whether ``model`` reaches ``reduction``x fewer MACs within ``points`` of macro F1.

    The row is chosen by validation F1 among those with at least ``reduction``x; its test loss
    decides. A second sentence gives the largest cut whose *validation* loss stays in bounds.
    """
    ok = _ok(rows, model)
    label = f"{model}, >= {reduction:g}x fewer MACs at <= {points:g} point(s) of macro F1 lost"
    if not ok:
        return f"- {label}: no finished rows."
    reach = [r for r in ok if r["macs_reduction"] >= reduction]
    if not reach:
        top = max(ok, key=lambda r: r["macs_reduction"])
        head = (
            f"- **{label}: missed** on MACs: no row reaches {reduction:g}x; "
            f"the largest cut is {top['macs_reduction']:.2f}x ({_describe(top)})."
        )
    else:
        pick = max(reach, key=lambda r: r["val_f1"])
        drop = pick["f1_drop_points"]
        verdict = (
            f"holds** with {points - drop:.2f} points to spare"
            if drop <= points
            else f"missed** by {drop - points:.2f} points"
        )
        head = (
            f"- **{label}: {verdict}: chosen by validation F1 among {len(reach)} rows at "
            f">= {reduction:g}x: {_describe(pick)}."
        )
    within = [r for r in ok if 100 * (r["baseline_val_f1"] - r["val_f1"]) <= points]
    if within:
        top = max(within, key=lambda r: r["macs_reduction"])
        tail = f" Within {points:g} points on validation, the largest cut: {_describe(top)}."
    else:
        tail = f" No row stays within {points:g} points on validation."
    return head + tail


def budget_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each model, budget and fine-tuning budget: the three series side by side."""
    ok = _ok(rows)
    index = {(r["model"], r["series"], r["budget"], r["finetune_epochs"]): r for r in ok}
    keys = sorted(
        {(r["model"], r["budget"], r["finetune_epochs"]) for r in ok if r["series"] == TARGET},
        key=lambda k: (k[0], -k[1], k[2]),
    )
    table = []
    for model, budget, epochs in keys:
        target = index[(model, TARGET, budget, epochs)]
        entry = {
            "model": model,
            "budget": _fraction(budget),
            "finetune_epochs": epochs,
            "target_f1": target["f1"],
            "target_macs": target["macs"],
        }
        for series, name in ((WEIGHTED, "weighted"), (RATIO_EQ, "ratio"), (VBMF_EQ, "vbmf")):
            other = index.get((model, series, budget, epochs))
            if other is None:
                continue
            entry[f"{name}_rank"] = other["rank"]
            entry[f"{name}_f1"] = other["f1"]
            entry[f"{name}_macs_dev"] = other["macs"] / target["macs"] - 1
            entry[f"margin_vs_{name}"] = 100 * (target["f1"] - other["f1"])
        entry["verdict"] = _verdict(entry)
        table.append(entry)
    return table


def _verdict(entry: Mapping[str, Any], tolerance: float = 0.02) -> str:
    parts = []
    for name in ("ratio", "vbmf"):
        if f"{name}_f1" not in entry:
            parts.append(f"no {name} row")
            continue
        margin = entry[f"margin_vs_{name}"]
        if margin == 0:
            word = f"ties with {name}"
        elif margin > 0:
            word = f"beats {name} by {margin:.2f}"
        else:
            word = f"loses to {name} by {-margin:.2f}"
        if abs(entry[f"{name}_macs_dev"]) > tolerance:
            word += f" (MACs not matched: {entry[f'{name}_macs_dev']:+.1%})"
        parts.append(word)
    return "; ".join(parts)


def budget_lines(table: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per model: in how many comparisons target-macs beats both, and the misses."""
    lines = []
    for model in dict.fromkeys(e["model"] for e in table):
        entries = [e for e in table if e["model"] == model]
        wins = [
            e
            for e in entries
            if e.get("margin_vs_ratio", -1) > 0 and e.get("margin_vs_vbmf", -1) > 0
        ]
        misses = [
            f"{e['budget']} MACs, {e['finetune_epochs']} epochs: {e['verdict']} points"
            for e in entries
            if e not in wins
        ]
        line = (
            f"- **{model}, target-macs vs ratio and weakened vbmf at equal MACs: beats both in "
            f"{len(wins)} of {len(entries)}** (budget x fine-tuning) comparisons"
        )
        lines.append(line + (f"; not in: {' | '.join(misses)}." if misses else "."))
    return lines


# --------------------------------------------------------------------------- report


def _pct(value: float) -> str:
    return f"{value:+.1%}"


ROW_COLUMNS = [
    Column("model"),
    Column("series"),
    Column("method"),
    Column("rank"),
    Column("finetune_epochs", "FT ep", "d"),
    Column("macs", "MACs", ",d"),
    Column("macs_reduction", "MACs cut", ".2f"),
    Column("params", "params", ",d"),
    Column("f1_before_finetune", "F1 decomposed", ".4f"),
    Column("f1_after_calibration", "F1 BN-calibrated", ".4f"),
    Column("f1", "F1", ".4f"),
    Column("f1_drop_points", "points lost", ".2f"),
    Column("val_f1", "val F1", ".4f"),
    Column("competition_score", "score", ".4f"),
    Column("latency_cpu_b1_ms", "ms b1", ".2f"),
    Column("latency_cpu_b64_ms", "ms b64", ".1f"),
    Column("seconds", "s", ".0f"),
    Column("status"),
    Column("note"),
]
BUDGET_COLUMNS = [
    Column("model"),
    Column("budget", "MACs budget"),
    Column("finetune_epochs", "FT ep", "d"),
    Column("target_macs", "target-macs MACs", ",d"),
    Column("target_f1", "target-macs F1", ".4f"),
    Column("weighted_f1", "+importance F1", ".4f"),
    Column("weighted_macs_dev", "+importance MACs vs target", _pct),
    Column("ratio_rank", "ratio"),
    Column("ratio_macs_dev", "ratio MACs vs target", _pct),
    Column("ratio_f1", "ratio F1", ".4f"),
    Column("vbmf_rank", "vbmf"),
    Column("vbmf_macs_dev", "vbmf MACs vs target", _pct),
    Column("vbmf_f1", "vbmf F1", ".4f"),
    Column("verdict", "target-macs (points)"),
]
BASELINE_COLUMNS = [
    Column("model"),
    Column("f1", "F1", ".4f"),
    Column("val_f1", "val F1", ".4f"),
    Column("macs", "MACs", ",d"),
    Column("macs_competition", "MACs (ptflops)", ",d"),
    Column("params", "params", ",d"),
    Column("competition_score", "score", ".4f"),
    Column("latency_cpu_b1_ms", "ms b1", ".2f"),
    Column("latency_cpu_b64_ms", "ms b64", ".1f"),
    Column("epochs", "epochs", "d"),
    Column("train_seconds_per_epoch", "s / epoch", ".0f"),
    Column("source"),
]


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """The goals (resnet18 first) and the budget comparison, as markdown bullets."""
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    models.sort(key=lambda m: m != GOAL_MODEL)
    lines = []
    if GOAL_MODEL not in models:
        lines.append(f"- {GOAL_MODEL} is not in this run; the goals are shown for the models run.")
    for model in models:
        lines += [goal_line(rows, model, reduction, points) for reduction, points in GOALS]
    return lines + budget_lines(budget_table(rows))


def render_markdown(result: Mapping[str, Any], plot_name: str) -> str:
    """The report, rendered from a results dict (as read back from the JSON)."""
    rows = result["rows"]
    parts = [
        "# Quality: macro F1 against MACs after decomposition",
        "",
        "Generated by `python -m benchmarks.bench_quality` from the JSON beside it; "
        "do not edit by hand.",
        "",
        "## Summary",
        "",
        f"Goals (issue 5, for {GOAL_MODEL}): "
        + " and ".join(f">= {r:g}x fewer MACs at <= {p:g} points lost" for r, p in GOALS)
        + "; target-macs rows beat ratio and weakened vbmf at equal MACs (issue 6).",
        "",
        *summary_lines(result),
        "",
        f"![F1 against MACs]({plot_name})",
        "",
        "## Baselines",
        "",
        render_table(result.get("baselines", []), BASELINE_COLUMNS),
        "## Budgeted rows against uniform ratio and weakened vbmf at equal MACs",
        "",
        render_table(budget_table(rows), BUDGET_COLUMNS),
        "## All rows",
        "",
        render_table(rows, ROW_COLUMNS),
        "## Notes",
        "",
        *[f"- {n}" for n in result.get("notes", [])],
        "",
        render_meta(result["meta"]),
    ]
    return "\n".join(parts)


def _family(row: Mapping[str, Any]) -> str:
    """A marker family: the rank strategy without its parameter (vbmf and vbmf:WF apart)."""
    if row["series"] != SWEEP:
        return row["series"]
    rank = str(row["rank"])
    return "vbmf:WF" if rank.startswith("vbmf:") else rank.split(":")[0]


MARKERS = {
    "vbmf": "v",
    "vbmf:WF": "^",
    "ratio": "s",
    "energy": "D",
    TARGET: "*",
    WEIGHTED: "p",
    RATIO_EQ: "P",
    VBMF_EQ: "X",
}
COLORS = {"tucker": "C0", "cp": "C1", "svd": "C2", "auto": "C3"}


def _plot_model(ax: Any, rows: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None) -> None:
    top = max(r["finetune_epochs"] for r in rows)
    for r in rows:
        filled = r["finetune_epochs"] == top
        color = COLORS.get(r["method"], "C7")
        ax.scatter(
            r["macs"],
            r["f1"],
            marker=MARKERS.get(_family(r), "o"),
            s=70 if r["series"] == TARGET else 35,
            facecolors=color if filled else "none",
            edgecolors=color,
            label=f"{r['method']} {_family(r)}"
            + ("" if filled else f" ({r['finetune_epochs']} ep)"),
        )
    for series, style in ((TARGET, "-"), (WEIGHTED, "-."), (RATIO_EQ, "--"), (VBMF_EQ, ":")):
        line = sorted((r for r in rows if r["series"] == series and r["finetune_epochs"] == top),
                      key=lambda r: r["macs"])  # fmt: skip
        if line:
            ax.plot([r["macs"] for r in line], [r["f1"] for r in line], style, color="grey", lw=1)
    if base is not None:
        ax.scatter(base["macs"], base["f1"], marker="o", s=80, color="black", label="baseline")
        for (reduction, points), marker in zip(GOALS, "+x", strict=True):
            ax.scatter(base["macs"] / reduction, base["f1"] - points / 100, marker=marker, s=120,
                       color="black", label=f"goal {reduction:g}x, -{points:g} pt")  # fmt: skip


def plot_pareto(result: Mapping[str, Any], path: Path) -> None:
    """Test F1 against MACs (log x), one panel per model; filled = the largest fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(result["rows"])
    models = list(dict.fromkeys(r["model"] for r in ok)) or ["(no rows)"]
    bases = {b["model"]: b for b in result.get("baselines", [])}
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in ok if r["model"] == model]
        if rows:
            _plot_model(ax, rows, bases.get(model))
        ax.set_xscale("log")
        ax.set_xlabel("MACs per image (thop, log scale)")
        ax.set_ylabel("macro F1 (test)")
        ax.set_title(f"{model}: F1 against MACs")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small CNN on 512 images (smoke)")
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--ranks", nargs="+", default=None, help=f"default: {' '.join(RANKS)}")
    parser.add_argument(
        "--budgets", type=float, nargs="*", default=None, help="MACs fractions (0.25 0.125 0.0625)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="baseline epochs (12)")
    parser.add_argument("--finetune-epochs", type=int, nargs="+", default=None, help="0 1")
    parser.add_argument("--data", default=None, help="fashion-mnist[:DIR] or an ImageFolder")
    parser.add_argument("--train-subset", type=int, default=None, help="train images (all)")
    parser.add_argument("--test-subset", type=int, default=None, help="test images (all)")
    parser.add_argument("--cp-budget", type=float, default=None, help="s per CP decomposition")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (tiny: 1)")
    parser.add_argument("--cache", type=Path, default=None, help="baselines (runs/bench)")
    parser.add_argument("--fresh", action="store_true", help="recompute rows already written")
    parser.add_argument("--verbose", action="store_true", help="log the library's progress")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    from decomp.recipes import FINETUNE_LR

    tiny = args.tiny
    cache = args.cache or REPO / "runs" / "bench"
    if args.cache is None and tiny and Path(args.output) != RESULTS_DIR:
        cache = Path(args.output) / "bench_cache"  # a smoke run leaves nothing behind elsewhere

    def pick(given: Any, small: Any, full: Any) -> Any:
        return given if given is not None else (small if tiny else full)

    return Config(
        models=list(args.models or (TINY_MODELS if tiny else MODELS)),
        methods=list(args.methods or METHODS),
        ranks=list(args.ranks or (("ratio:0.5",) if tiny else RANKS)),
        budgets=list(pick(args.budgets, (0.25,), BUDGETS)),
        finetune_epochs=sorted(set(pick(args.finetune_epochs, FINETUNE_EPOCHS, FINETUNE_EPOCHS))),
        data=args.data or "fashion-mnist",
        input_size=[3, 32, 32],
        epochs=pick(args.epochs, 2, BASELINE_EPOCHS),
        batch_size=16 if tiny else 128,
        lr=0.05 if tiny else 0.1,
        finetune_lr=FINETUNE_LR,
        seed=0,
        train_subset=pick(args.train_subset, 512, None),
        val_split=256 if tiny else None,
        test_subset=pick(args.test_subset, 500, None),
        calibration_batches=8 if tiny else 30,
        cp_budget_s=pick(args.cp_budget, 10.0, 120.0),
        match_tolerance=0.02,
        tune_max_iter=6 if tiny else 16,
        latency_repeats=3 if tiny else 20,
        threads=pick(args.threads, 1, None),
        device=args.device,
        cache_dir=str(cache),
        demo_baseline=None if tiny else str(REPO / "runs" / "demo" / "baseline.pt"),
        tiny=tiny,
    )


def _check(config: Config) -> None:
    from rank_selection import parse_rank_spec

    for model in config.models:
        if model not in MODEL_ARCHS:
            raise SystemExit(f"unknown model {model!r}; expected one of {sorted(MODEL_ARCHS)}")
    for spec in config.ranks:
        try:
            parse_rank_spec(spec)
        except ValueError as exc:
            raise SystemExit(f"bad rank spec {spec!r}: {exc}") from None
    if any(not 0 < b <= 1 for b in config.budgets) or any(e < 0 for e in config.finetune_epochs):
        raise SystemExit("budgets must lie in (0, 1] and fine-tuning epochs be >= 0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``quality[_tiny].json``, ``.md`` and the plot into ``--output``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    args = parse_args(argv)
    config = make_config(args)
    _check(config)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stem = "quality_tiny" if config.tiny else "quality"
    json_path = Path(args.output) / f"{stem}.json"
    console = Console(stderr=True)
    total = sum(1 + len(jobs_for(config, m)) for m in config.models)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    start = time.perf_counter()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("bench-quality: data", total=total)
        bundle = load_bundle(config)

        def progress(label: str, advance: int) -> None:
            bar.update(task, description=label, advance=advance)

        runner = Runner(config, json_path, args.fresh, progress)
        for model in config.models:
            runner.run_model(model, bundle, device)
        bar.update(task, completed=total, description="bench-quality: report")
    runner.write()
    result = read_results(json_path)
    plot_name = f"{stem}_pareto.png"
    write_text(json_path.with_suffix(".md"), render_markdown(result, plot_name))
    plot_pareto(result, json_path.with_name(plot_name))
    bad = [r["job"] for r in result["rows"] if r.get("status") != "ok"]
    console.print(
        f"wrote {json_path} in {time.perf_counter() - start:.0f} s "
        f"({runner.reused} rows reused)"
        + (f"; failed: {', '.join(sorted(set(bad)))}" if bad else "")
    )
    for line in summary_lines(result):
        console.print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
