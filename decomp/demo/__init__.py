"""The project in one call: baseline, Tucker-2, batch-norm calibration, distillation, numbers.

:func:`run_demo` trains (or reuses) a ResNet-18 on Fashion-MNIST, decomposes it, re-estimates its
batch-norm statistics, fine-tunes it with distillation from the baseline, evaluates every stage
and writes ``results.json`` (rewritten after every stage, so a long run can be watched) and a plot
of F1 against MACs. ``make demo`` runs it; the command line renders its progress and results.

Two recipes (:data:`RECIPES`): ``quick`` (the default, planned to finish within 15 minutes on an
idle 2-core machine) and ``full`` (the 12-epoch baseline the project's other numbers were measured
on). ``results.json`` records the wall and CPU time of every stage, the machine's load while the
demo ran, and whether the demo's targets (:data:`TARGETS`) were met.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decomp._utils import atomic_write, atomic_write_text, environment, plain
from decomp.batchnorm import calibrate
from decomp.checkpoint import load, model_meta, save
from decomp.data import DataBundle
from decomp.demo.config import (
    DEFAULT_RECIPE,
    DEMO_METHOD,
    DEMO_OUTPUT_DIR,
    DEMO_RANK,
    RECIPES,
    TARGET_BASELINE_F1,
    TARGET_F1_DROP,
    TARGET_MACS_RATIO,
    TARGET_SECONDS,
    TARGETS,
    DemoConfig,
    DemoRecipe,
    demo_config,
)
from decomp.demo.stages import LOAD_SAMPLE_SECONDS, LoadSampler, ProgressCallback, Stages, counted
from decomp.devices import pick_device
from decomp.evaluate import evaluate, quick_scores, val_f1
from decomp.plan import Plan, apply, plan
from decomp.recipes import (
    baseline_config,
    cached_baseline,
    finetune,
    load_bundle,
    train_baseline,
)
from decomp.recipes.training import without_augmentation
from decomp.seeding import seed_loader

__all__ = [
    "DEFAULT_RECIPE",
    "DEMO_METHOD",
    "DEMO_OUTPUT_DIR",
    "DEMO_RANK",
    "LOAD_SAMPLE_SECONDS",
    "RECIPES",
    "TARGETS",
    "TARGET_BASELINE_F1",
    "TARGET_F1_DROP",
    "TARGET_MACS_RATIO",
    "TARGET_SECONDS",
    "DemoConfig",
    "DemoRecipe",
    "ProgressCallback",
    "demo_baseline",
    "demo_config",
    "plot_f1_vs_macs",
    "run_demo",
]

logger = logging.getLogger(__name__)


def demo_baseline(
    cfg: DemoConfig, bundle: DataBundle, device: torch.device
) -> tuple[nn.Module, bool]:
    """The baseline of ``cfg``: ``output_dir/baseline.pt`` when it was trained with the same
    settings (see :func:`decomp.recipes.cached_baseline`), else trained now and saved there.

    Returns:
        ``(model on device, reused)``; a trained model is the file loaded back, as every later
        user will see it.
    """
    path = Path(cfg.output_dir) / "baseline.pt"
    key = baseline_config(
        cfg.arch,
        cfg.arch_kwargs,
        cfg.data,
        cfg.input_size,
        cfg.epochs,
        cfg.batch_size,
        cfg.lr,
        cfg.seed,
        cfg.train_subset,
        cfg.val_split,
        cfg.augment,
    )
    model = cached_baseline(path, key, cfg.retrain)
    if model is not None:
        return model.to(device), True
    train_baseline(
        cfg.arch,
        cfg.arch_kwargs,
        bundle,
        cfg.input_size,
        cfg.epochs,
        path,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        train_subset=cfg.train_subset,
        val_split=cfg.val_split,
        device=device,
        evaluate_test=False,
        data_name=cfg.data,
        augment=cfg.augment,
    )
    return load(path).to(device), False  # the file, as every later user will see it


def _plan_summary(plan: Plan) -> dict[str, Any]:
    layers = [
        {
            "name": lp.name,
            "ranks": lp.ranks,
            "macs_before": lp.macs_before,
            "macs_after": lp.macs_after,
        }
        for lp in plan.decomposed
    ]
    skipped = [{"name": lp.name, "reason": lp.reason} for lp in plan.layers if not lp.method]
    return {
        "method": plan.method,
        "rank": plan.rank,
        "macs_before": plan.model_macs,
        "macs_after": plan.macs_after,
        "layers": layers,
        "skipped": skipped,
    }


def _reload_check(
    model: nn.Module, path: Path, bundle: DataBundle, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``path`` back and compare its logits on one validation batch with ``model``'s."""
    loaded = load(path).to(device)
    images = next(iter(bundle.val_loader))[0].to(device)
    with torch.no_grad():
        diff = (model.eval()(images) - loaded.eval()(images)).abs().max().item()
    return loaded, {"max_logit_diff_after_reload": diff}


def _entry(metrics: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    return {**metrics, **more}


class _Report:
    """results.json, rewritten atomically after every stage so a long run can be watched."""

    def __init__(self, cfg: DemoConfig, stages: Stages, load: LoadSampler) -> None:
        self.path = Path(cfg.output_dir) / "results.json"
        self.data: dict[str, Any] = {"status": "running", "config": cfg.to_dict()}
        self.stages, self.load = stages, load

    def update(self, **entries: Any) -> None:
        self.data.update(entries)
        self.data["timings"] = {**self.stages.seconds, "total": self.stages.total()}
        self.data["cpu_seconds"] = {**self.stages.cpu_seconds, "total": self.stages.cpu_total()}
        self.data["load"] = self.load.record()
        atomic_write_text(self.path, json.dumps(plain(self.data), indent=2))


def run_demo(
    output_dir: str | os.PathLike[str] = DEMO_OUTPUT_DIR,
    epochs: int | None = None,
    finetune_epochs: int | None = None,
    rank: str | None = None,
    method: str = DEMO_METHOD,
    *,
    recipe: str = DEFAULT_RECIPE,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The project in one call: baseline, Tucker-2, BN calibration, distillation, numbers.

    1. Trains a torchvision resnet18 on Fashion-MNIST (32 px, grey replicated to RGB) with the
       baseline recipe for the recipe's epochs, or reuses ``output_dir/baseline.pt`` when it was
       trained with the same settings (logged; ``results["baseline"]["reused"]``).
    2. Decomposes every 3x3 conv that gets cheaper with Tucker-2 at ``rank`` ranks, or within
       the recipe's MACs budget (``target_macs``; a ``rank`` given replaces it).
    3. Re-estimates batch-norm statistics over ``calibration_batches`` training batches.
    4. Saves ``decomposed.pt``, loads it back (the logits must not change) and fine-tunes the
       loaded model for ``finetune_epochs`` with distillation from the baseline (SGD, cosine).
    5. Evaluates each model on the test split and writes ``results.json`` and
       ``f1_vs_macs.png``.

    ``results.json`` holds ``baseline``, ``decomposed`` and ``finetuned`` (each a full
    :func:`decomp.evaluate.evaluate` entry), ``config``, ``versions``, ``machine``, ``timings``
    (wall seconds per stage and ``total``), ``cpu_seconds`` (the same in process CPU time),
    ``load`` (the load average at the start and every ``LOAD_SAMPLE_SECONDS``) and ``summary``
    (the three models' F1, MACs and params, the ratios, and ``targets``: each of
    :data:`TARGETS`, met or not).

    Uses CUDA when available (AMP and channels_last while training), else the CPU.

    Args:
        output_dir: where the files go.
        epochs: baseline training epochs; default the recipe's.
        finetune_epochs: distillation epochs; default the recipe's.
        rank: rank spec (see rank_selection); default the recipe's. Given, it replaces the
            recipe's MACs budget (``target_macs``, an option: a fraction of the baseline's MACs).
        method: factorization (``tucker``, ``cp``, ``svd``, ``auto``).
        recipe: ``quick`` or ``full`` (:data:`RECIPES`).
        progress: told of every stage's start, steps and end (see :data:`ProgressCallback`);
            the command line draws it as progress bars.
        **options: further :class:`DemoConfig` fields (``data``, ``arch``, ``arch_kwargs``,
            ``input_size``, ``batch_size``, ``augment``, ``train_subset``,
            ``calibration_batches``, ``finetune_lr``, ``seed``, ``workers``, ``latency``,
            ``retrain``, ``device``, ...). ``augment=False`` needs in-memory data
            (Fashion-MNIST).

    Returns:
        The results dict that was written to ``results.json``.
    """
    cfg = demo_config(
        recipe,
        epochs,
        finetune_epochs,
        output_dir=str(output_dir),
        rank=rank,
        method=method,
        **options,
    )
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    stages = Stages(progress)
    with LoadSampler() as load:
        report = _Report(cfg, stages, load)
        report.update(**environment())
        device = pick_device(cfg.device, notice="the demo runs on the CPU")
        with stages("data"):
            bundle = _demo_bundle(cfg, stages)
        baseline = _baseline_stage(cfg, bundle, device, stages, report)
        decomposed = _decompose_stage(cfg, bundle, baseline, device, stages, report)
        _finetune_stage(cfg, bundle, baseline, decomposed, device, stages, report)
        with stages("report"):
            plot = plot_f1_vs_macs(report.data, Path(cfg.output_dir) / "f1_vs_macs.png")
        summary = _summary(report.data, stages.total())
        report.update(status="done", summary=summary, plot=str(plot))
    logger.info("demo done in %.0f s: %s", stages.total(), report.path)
    return report.data


def _demo_bundle(cfg: DemoConfig, stages: Stages) -> DataBundle:
    """The data, not augmented when the recipe says so, its loaders counting their batches."""
    bundle = load_bundle(
        cfg.data,
        cfg.input_size,
        cfg.batch_size,
        cfg.seed,
        cfg.workers,
        cfg.train_subset,
        cfg.val_split,
    )
    if not cfg.augment:
        bundle = without_augmentation(bundle, cfg.seed)
    return counted(bundle, stages)


def _batches(bundle: DataBundle) -> tuple[int, int, int]:
    """Batches per pass over the train, validation and test (else validation) splits."""
    evaluation = bundle.test_loader if bundle.test_loader is not None else bundle.val_loader
    return len(bundle.train_loader), len(bundle.val_loader), len(evaluation)


def _evaluate_cfg(model: nn.Module, bundle: DataBundle, cfg: DemoConfig) -> dict[str, Any]:
    return evaluate(model, bundle, latency=cfg.latency, latency_repeats=cfg.latency_repeats)


def _baseline_stage(
    cfg: DemoConfig, bundle: DataBundle, device: torch.device, stages: Stages, report: _Report
) -> nn.Module:
    train, val, test = _batches(bundle)
    with stages("baseline", cfg.epochs * (train + val) + val):
        model, reused = demo_baseline(cfg, bundle, device)
    with stages("evaluate_baseline", test + val):
        metrics = _evaluate_cfg(model, bundle, cfg)
        f1_val = val_f1(model, bundle)
    training = model_meta(model).get("extra", {}).get("training", {})
    report.update(
        baseline=_entry(
            metrics,
            reused=reused,
            val_f1=f1_val,
            path=str(Path(cfg.output_dir) / "baseline.pt"),
            training_seconds=training.get("seconds"),
            history=training.get("history"),
        )
    )
    logger.info("baseline: test F1 %.4f, %s MACs", metrics["f1"], f"{metrics['macs']:,}")
    return model


def _decompose_stage(
    cfg: DemoConfig,
    bundle: DataBundle,
    baseline: nn.Module,
    device: torch.device,
    stages: Stages,
    report: _Report,
) -> nn.Module:
    train, val, test = _batches(bundle)
    with stages("decompose", None):
        p = plan(baseline, cfg.method, cfg.rank, list(cfg.input_size), target_macs=cfg.target_macs)
        stages.expect(len(p.decomposed))
        model = apply(baseline, p, progress=stages.tick)
    with stages("evaluate_before_calibration", test + val):
        before = quick_scores(model, bundle)
    with stages("calibrate", min(cfg.calibration_batches, train)):
        seed_loader(bundle.train_loader, cfg.seed)  # same batches whether or not cached
        calibrate(model, bundle.train_loader, batches=cfg.calibration_batches)
    with stages("evaluate_decomposed", test + val):
        metrics = _evaluate_cfg(model, bundle, cfg)
        f1_val = val_f1(model, bundle)
    path = Path(cfg.output_dir) / "decomposed.pt"
    with stages("save_and_reload"):
        save(
            model,
            path,
            extra={"bn_calibrated": True, "calibration_batches": cfg.calibration_batches},
        )
        loaded, check = _reload_check(model, path, bundle, device)
    entry = _entry(
        metrics,
        f1_before_calibration=before["f1"],
        accuracy_before_calibration=before["accuracy"],
        val_f1_before_calibration=before["val_f1"],
        f1_after_calibration=metrics["f1"],
        val_f1=f1_val,
        calibration_batches=cfg.calibration_batches,
        plan=_plan_summary(p),
        path=str(path),
        reload=check,
    )
    report.update(decomposed=entry)
    logger.info(
        "decomposed: %s MACs, test F1 %.4f before and %.4f after BN calibration",
        f"{metrics['macs']:,}",
        before["f1"],
        metrics["f1"],
    )
    return loaded


def _finetune_stage(
    cfg: DemoConfig,
    bundle: DataBundle,
    baseline: nn.Module,
    decomposed: nn.Module,
    device: torch.device,
    stages: Stages,
    report: _Report,
) -> None:
    train, val, test = _batches(bundle)
    path = Path(cfg.output_dir) / "finetuned.pt"
    with stages("finetune", cfg.finetune_epochs * (train + val) + val):
        outcome = finetune(
            decomposed,
            bundle,
            teacher=baseline,
            epochs=cfg.finetune_epochs,
            output=path,
            lr=cfg.finetune_lr,
            seed=cfg.seed,
            device=device,
            evaluate_test=False,
        )
    with stages("evaluate_finetuned", test):
        metrics = _evaluate_cfg(outcome.model, bundle, cfg)
    start_f1 = outcome.history[0]["val_f1"] if outcome.history else None
    report.data["decomposed"]["reload"]["finetune_start_val_f1"] = start_f1
    report.data["decomposed"]["reload"]["same_val_f1"] = (
        start_f1 == report.data["decomposed"]["val_f1"]
    )
    report.update(
        finetuned=_entry(
            metrics,
            val_f1=outcome.best_val_f1,
            best_epoch=outcome.best_epoch,
            history=outcome.history,
            training_seconds=outcome.seconds,
            path=str(path),
        )
    )
    logger.info("fine-tuned: test F1 %.4f", metrics["f1"])


def _summary(results: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The three models' F1, MACs and params, the ratios, and which of :data:`TARGETS` were met."""
    names = ("baseline", "decomposed", "finetuned")
    base, dec, fine = (results[name] for name in names)
    ratio = dec["macs"] / base["macs"]
    drop = base["f1"] - fine["f1"]
    met = (
        base["f1"] >= TARGET_BASELINE_F1,
        ratio <= TARGET_MACS_RATIO,
        drop <= TARGET_F1_DROP,
        seconds <= TARGET_SECONDS,
    )
    return {
        "models": {n: {k: results[n][k] for k in ("f1", "macs", "params")} for n in names},
        "macs_ratio": ratio,
        "macs_competition_ratio": dec["macs_competition"] / base["macs_competition"],
        "params_ratio": dec["params"] / base["params"],
        "f1_drop_after_finetune": drop,
        "total_seconds": seconds,
        "targets": dict(zip(TARGETS, met, strict=True)),
    }


def plot_f1_vs_macs(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG of test macro F1 against MACs (thop) for the demo's models; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    points = [(k, results[k]) for k in ("baseline", "decomposed", "finetuned") if k in results]
    for label, entry in points:
        ax.scatter(entry["macs"] / 1e6, entry["f1"], s=60, label=label, zorder=3)
        ax.annotate(
            f"{entry['f1']:.3f}",
            (entry["macs"] / 1e6, entry["f1"]),
            xytext=(6, -4),
            textcoords="offset points",
            fontsize=8,
        )
    dec = results.get("decomposed")
    if dec and "f1_before_calibration" in dec:
        ax.scatter(
            dec["macs"] / 1e6,
            dec["f1_before_calibration"],
            marker="x",
            color="grey",
            label="decomposed, before BN calibration",
            zorder=3,
        )
    ax.set_xlabel("MACs (millions, thop, batch 1)")
    ax.set_ylabel("macro F1 (test)")
    ax.set_title("F1 against MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
