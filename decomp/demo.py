"""The project in one call: baseline, Tucker-2, batch-norm calibration, distillation, numbers.

:func:`run_demo` trains (or reuses) a ResNet-18 on Fashion-MNIST, decomposes it, re-estimates its
batch-norm statistics, fine-tunes it with distillation from the baseline, evaluates every stage
and writes ``results.json`` (rewritten after every stage, so a long run can be watched) and a plot
of F1 against MACs. ``make demo`` runs it; the command line renders its results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decomp._utils import atomic_write, atomic_write_text, environment, plain
from decomp.batchnorm import calibrate
from decomp.checkpoint import load, model_meta, save
from decomp.data import DataBundle
from decomp.devices import pick_device
from decomp.evaluate import evaluate, quick_scores, val_f1
from decomp.plan import Plan, apply, plan
from decomp.recipes import (
    BASELINE_EPOCHS,
    CALIBRATION_BATCHES,
    DEFAULT_ARCH,
    DEFAULT_DATA,
    DEFAULT_INPUT_SIZE,
    FINETUNE_EPOCHS,
    FINETUNE_LR,
    baseline_config,
    cached_baseline,
    finetune,
    load_bundle,
    train_baseline,
)
from decomp.seeding import seed_loader

logger = logging.getLogger(__name__)

DEMO_EPOCHS = BASELINE_EPOCHS
DEMO_FINETUNE_EPOCHS = FINETUNE_EPOCHS
# Rank: Tucker-2 with EVBMF ranks *weakened* towards full rank, R = R_full - 0.6 (R_full - R_vbmf).
# Raw EVBMF is too aggressive: on FACTS.md's 4-epoch model it left ranks 1 to 5 (F1 0.14 after BN
# calibration), and on the demo's 12-epoch baseline (validation F1 0.9247) it keeps 8.5 % of the
# MACs at validation F1 0.877. The factor was chosen on the validation split only, never the test
# set: the weakening with the best validation F1 after BN calibration (30 batches, no training)
# among those that at least halve the MACs (thop). Measured on that baseline:
#   vbmf      MACs x0.085  val F1 0.8775      vbmf:0.6  MACs x0.383  val F1 0.9206
#   vbmf:0.8  MACs x0.211  val F1 0.9150      vbmf:0.5  MACs x0.487  val F1 0.9198
#   vbmf:0.7  MACs x0.291  val F1 0.9203      vbmf:0.4  MACs x0.622  (does not halve the MACs)
# (vbmf:0.7 is within noise of 0.6 at 3.4x fewer MACs: the choice for a smaller model.)
DEMO_RANK = "vbmf:0.6"
DEMO_METHOD = "tucker"
DEMO_OUTPUT_DIR = "runs/demo"


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (see there)."""

    output_dir: str = DEMO_OUTPUT_DIR
    epochs: int = DEMO_EPOCHS
    finetune_epochs: int = DEMO_FINETUNE_EPOCHS
    rank: str = DEMO_RANK
    method: str = DEMO_METHOD
    data: str = DEFAULT_DATA
    arch: str = DEFAULT_ARCH
    arch_kwargs: dict[str, Any] | None = None
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    batch_size: int = 128
    lr: float = 0.1
    finetune_lr: float = FINETUNE_LR
    calibration_batches: int = CALIBRATION_BATCHES
    train_subset: int | None = None
    val_split: float | int | None = None
    seed: int = 0
    workers: int | None = 0  # Fashion-MNIST is in memory and batch-transformed: no workers needed
    latency: bool = True
    latency_repeats: int = 20
    retrain: bool = False
    device: str | None = None
    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


class _Stages:
    """Wall time per stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, name: str) -> _Timer:
        return _Timer(self, name)

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 3)


class _Timer:
    def __init__(self, stages: _Stages, name: str) -> None:
        self.stages, self.name = stages, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        logger.info("demo: %s", self.name.replace("_", " "))

    def __exit__(self, *exc: Any) -> None:
        self.stages.seconds[self.name] = round(time.perf_counter() - self.start, 3)


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
        progress=cfg.progress,
        evaluate_test=False,
        data_name=cfg.data,
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

    def __init__(self, cfg: DemoConfig, stages: _Stages) -> None:
        self.path = Path(cfg.output_dir) / "results.json"
        self.data: dict[str, Any] = {"status": "running", "config": cfg.to_dict()}
        self.stages = stages

    def update(self, **entries: Any) -> None:
        self.data.update(entries)
        self.data["timings"] = {**self.stages.seconds, "total": self.stages.total()}
        atomic_write_text(self.path, json.dumps(plain(self.data), indent=2))


def run_demo(
    output_dir: str | os.PathLike[str] = DEMO_OUTPUT_DIR,
    epochs: int = DEMO_EPOCHS,
    finetune_epochs: int = DEMO_FINETUNE_EPOCHS,
    rank: str = DEMO_RANK,
    method: str = DEMO_METHOD,
    *,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """The project in one call: baseline, Tucker-2, BN calibration, distillation, numbers.

    1. Trains a torchvision resnet18 on Fashion-MNIST (32 px, grey replicated to RGB) with the
       baseline recipe, or reuses ``output_dir/baseline.pt`` when it was trained with the same
       settings (logged; ``results["baseline"]["reused"]``).
    2. Decomposes every 3x3 conv that gets cheaper with Tucker-2 at ``rank`` ranks.
    3. Re-estimates batch-norm statistics over ``calibration_batches`` training batches.
    4. Saves ``decomposed.pt``, loads it back (the logits must not change) and fine-tunes the
       loaded model for ``finetune_epochs`` with distillation from the baseline (SGD, cosine).
    5. Evaluates each model on the test split and writes ``results.json`` (entries ``baseline``,
       ``decomposed``, ``finetuned``, plus ``config``, ``timings``, ``versions``, ``machine``,
       ``summary``) and ``f1_vs_macs.png``.

    Uses CUDA when available (AMP and channels_last while training), else the CPU.

    Args:
        output_dir: where the files go.
        epochs: baseline training epochs.
        finetune_epochs: distillation epochs.
        rank: rank spec (see rank_selection), default weakened EVBMF.
        method: factorization (``tucker``, ``cp``, ``svd``, ``auto``).
        progress: show rich progress bars while training.
        **options: further :class:`DemoConfig` fields (``data``, ``arch``, ``arch_kwargs``,
            ``input_size``, ``batch_size``, ``train_subset``, ``calibration_batches``,
            ``finetune_lr``, ``seed``, ``workers``, ``latency``, ``retrain``, ``device``, ...).

    Returns:
        The results dict that was written to ``results.json``.
    """
    cfg = DemoConfig(
        output_dir=str(output_dir),
        epochs=epochs,
        finetune_epochs=finetune_epochs,
        rank=str(rank),
        method=method,
        progress=progress,
        **options,
    )
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    stages = _Stages()
    report = _Report(cfg, stages)
    report.update(**environment())
    device = pick_device(cfg.device, notice="the demo runs on the CPU")
    with stages("data"):
        bundle = load_bundle(
            cfg.data,
            cfg.input_size,
            cfg.batch_size,
            cfg.seed,
            cfg.workers,
            cfg.train_subset,
            cfg.val_split,
        )
    baseline = _baseline_stage(cfg, bundle, device, stages, report)
    decomposed = _decompose_stage(cfg, bundle, baseline, device, stages, report)
    _finetune_stage(cfg, bundle, baseline, decomposed, device, stages, report)
    with stages("report"):
        plot = plot_f1_vs_macs(report.data, Path(cfg.output_dir) / "f1_vs_macs.png")
    report.update(status="done", summary=_summary(report.data), plot=str(plot))
    logger.info("demo done in %.0f s: %s", stages.total(), report.path)
    return report.data


def _evaluate_cfg(model: nn.Module, bundle: DataBundle, cfg: DemoConfig) -> dict[str, Any]:
    return evaluate(model, bundle, latency=cfg.latency, latency_repeats=cfg.latency_repeats)


def _baseline_stage(
    cfg: DemoConfig, bundle: DataBundle, device: torch.device, stages: _Stages, report: _Report
) -> nn.Module:
    with stages("baseline"):
        model, reused = demo_baseline(cfg, bundle, device)
    with stages("evaluate_baseline"):
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
    stages: _Stages,
    report: _Report,
) -> nn.Module:
    with stages("decompose"):
        p = plan(baseline, cfg.method, cfg.rank, list(cfg.input_size))
        model = apply(baseline, p)
    with stages("evaluate_before_calibration"):
        before = quick_scores(model, bundle)
    with stages("calibrate"):
        seed_loader(bundle.train_loader, cfg.seed)  # same batches whether or not cached
        calibrate(model, bundle.train_loader, batches=cfg.calibration_batches)
    with stages("evaluate_decomposed"):
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
    stages: _Stages,
    report: _Report,
) -> None:
    path = Path(cfg.output_dir) / "finetuned.pt"
    with stages("finetune"):
        outcome = finetune(
            decomposed,
            bundle,
            teacher=baseline,
            epochs=cfg.finetune_epochs,
            output=path,
            lr=cfg.finetune_lr,
            seed=cfg.seed,
            device=device,
            progress=cfg.progress,
            evaluate_test=False,
        )
    with stages("evaluate_finetuned"):
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


def _summary(results: Mapping[str, Any]) -> dict[str, Any]:
    base, dec, fine = results["baseline"], results["decomposed"], results["finetuned"]
    ratio = dec["macs"] / base["macs"]
    drop = base["f1"] - fine["f1"]
    return {
        "macs_ratio": ratio,
        "macs_competition_ratio": dec["macs_competition"] / base["macs_competition"],
        "params_ratio": dec["params"] / base["params"],
        "f1_drop_after_finetune": drop,
        "targets": {
            "baseline_f1_at_least_0.92": base["f1"] >= 0.92,
            "macs_at_most_half": ratio <= 0.5,
            "f1_drop_at_most_1_point": drop <= 0.01,
        },
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
