"""Multi-stage compression: decompose, calibrate and fine-tune N times, down to a MACs target.

MUSCO's scheme (Gusak et al. 2019: several small cuts with fine-tuning between them lose less
than one deep cut), with decomp's MACs budget in place of a fixed weakening: stage k of N
spends a budget of ``target ** (k / N)`` of the original MACs over the *current* model, so
every stage re-estimates the allocation from the spectra the fine-tuning left, and a layer that
was factorized before is re-factorized at lower ranks by its own method (never nested). Each
stage:

1. plans ``target_macs`` at the stage's budget, output-aware on the training images (not
   augmented; ``fit="weights"`` fits the kernels alone), and applies the plan;
2. re-estimates batch-norm statistics on the same images (:func:`decomp.calibrate`);
3. fine-tunes for ``epochs_per_stage`` epochs with distillation from the teacher (the input
   model unless another is given), keeping the best validation epoch
   (:func:`decomp.recipes.finetune`).

Every choice is made on the validation split; test F1 is reported. Each stage is checkpointed
(a decomp file per stage beside ``output``, the last one *is* ``output``, and a JSON state
``OUTPUT.stages.json``), so ``resume=True`` continues a killed run: after a finished stage, from
the decomposed and calibrated start of an unfinished one, and inside its fine-tuning from the
training checkpoint. Every stage starts from the previous stage's file read back, so a resumed
run ends with exactly the weights of an uninterrupted one (on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decomp._utils import PathLike, atomic_write_text, plain
from decomp.batchnorm import calibrate
from decomp.checkpoint import (
    check_output_path,
    file_sha256,
    load,
    model_arch,
    model_meta,
    recorded_input_size,
    save,
)
from decomp.data import DataBundle, Preprocessing, recorded_preprocessing
from decomp.devices import pick_device
from decomp.evaluate import quick_scores
from decomp.metrics import count_macs, count_params
from decomp.plan import apply
from decomp.plan import plan as make_plan
from decomp.plan.budget import parse_macs_target
from decomp.recipes.compression import CALIBRATION_BATCHES, Stage, no_stage
from decomp.recipes.training import (
    DEFAULT_INPUT_SIZE,
    FINETUNE_LR,
    as_model,
    finetune,
    load_bundle,
    without_augmentation,
)
from decomp.seeding import seed_loader

logger = logging.getLogger(__name__)

STATE_FORMAT = "decomp.staged/1"
STAGED_METHOD = "auto"
STAGES = 3
EPOCHS_PER_STAGE = 1
FITS = ("outputs", "weights")


def stage_budgets(target: float, stages: int) -> list[float]:
    """The geometric schedule: stage k of ``stages`` keeps ``target ** (k / stages)`` of the
    original MACs (the last stage exactly ``target``)."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be a fraction in (0, 1] of the MACs; got {target}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1; got {stages}")
    return [target ** (k / stages) for k in range(1, stages + 1)]


def stage_paths(output: PathLike, stages: int) -> list[Path]:
    """The decomp file of every stage: ``<stem>.stage<k><suffix>`` beside ``output``, and
    ``output`` itself for the last."""
    out = Path(output)
    named = [out.with_name(f"{out.stem}.stage{k}{out.suffix}") for k in range(1, stages)]
    return [*named, out]


def state_path(output: PathLike) -> Path:
    """Where :func:`compress_in_stages` keeps its state: ``OUTPUT.stages.json``."""
    return Path(f"{output}.stages.json")


def _start_path(output: Path, k: int) -> Path:
    """The decomposed, calibrated model stage ``k`` fine-tunes from, beside ``output``
    (``<stem>.stage<k>.start<suffix>``, removed once the stage is done)."""
    return output.with_name(f"{output.stem}.stage{k}.start{output.suffix}")


@dataclass
class StageRecord:
    """What one stage did and measured.

    Attributes:
        stage: 1-based.
        budget: the MACs it was allowed, as a fraction of the original model's.
        target_macs: the same as a count (thop, batch 1).
        macs, params: of the stage's model (thop MACs, batch 1).
        rank: the plan's rank (``target-macs:COUNT``).
        factorized: how many layers the plan factorized (re-factorized ones included).
        val_f1_calibrated, test_f1_calibrated: macro F1 after decomposition and batch-norm
            re-estimation, before any training (test: the validation split when there is none).
        val_f1, test_f1: after fine-tuning (the kept epoch).
        best_epoch: the kept epoch (0: the calibrated start).
        epochs: fine-tuning epochs of the stage.
        seconds: wall time of ``plan`` (planning and factorizing), ``calibrate`` (batch norm
            and scoring), ``finetune`` and ``total``.
        load: the machine's load averages (1, 5, 15 min) when the stage ended.
        path: the stage's decomp file.
    """

    stage: int
    budget: float
    target_macs: int
    macs: int
    params: int
    rank: str
    factorized: int
    val_f1_calibrated: float
    test_f1_calibrated: float
    val_f1: float
    test_f1: float | None
    best_epoch: int
    epochs: int
    seconds: dict[str, float]
    load: list[float] | None
    path: str

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))


@dataclass
class StagedResult:
    """What :func:`compress_in_stages` returns.

    Attributes:
        model: the last finished stage's model (the input model when none finished).
        output: the final decomp file, or None while unfinished.
        finished: whether every stage is done (False after ``max_stages_this_run``).
        stages: the finished stages' records, in order.
        original: the input model's ``macs``, ``params``, ``val_f1`` and ``test_f1``.
        settings: what the run was started with (the state's settings).
        state: the JSON state file.
        resumed: whether this call continued a run from its state.
    """

    model: nn.Module
    output: str | None
    finished: bool
    stages: list[StageRecord]
    original: dict[str, Any]
    settings: dict[str, Any]
    state: str
    resumed: bool = False
    budgets: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain data (the ``--json`` output of the command)."""
        return plain(
            {
                "output": self.output,
                "finished": self.finished,
                "resumed": self.resumed,
                "state": self.state,
                "budgets": self.budgets,
                "original": self.original,
                "settings": self.settings,
                "stages": [s.to_dict() for s in self.stages],
            }
        )


def _load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


class _State:
    """The JSON state: the settings, the original's scores, the finished stages and the one
    under way (its plan's numbers and calibrated scores, once its start file is written)."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    @staticmethod
    def check(path: Path, resume: bool) -> None:
        """Refuse, before any work, to resume without a state or to start over one."""
        if resume and not path.exists():
            raise ValueError(
                f"nothing to resume: no state at {path}; run without resume (--resume) to start"
            )
        if not resume and path.exists():
            raise ValueError(
                f"{path} holds a staged run already: pass resume=True (--resume) to continue "
                "it, or remove it (and its stage files) to start again"
            )

    @classmethod
    def open(cls, path: Path, settings: Mapping[str, Any], resume: bool) -> tuple[_State, bool]:
        """The state to continue (``resume``) or a new one; ``(state, resumed)``."""
        cls.check(path, resume)
        if not resume:
            return cls(path, {"format": STATE_FORMAT, "settings": dict(settings)}), False
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a staged-run state ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a staged-run state (format {STATE_FORMAT})")
        saved = data.get("settings", {})
        differ = sorted(k for k in settings if saved.get(k) != plain(settings[k]))
        if differ:
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {plain(settings[k])!r}" for k in differ)
            raise ValueError(
                f"{path} was started with other settings ({shown}); resume with the same "
                "ones, or remove it to start again"
            )
        return cls(path, data), True

    @property
    def stages(self) -> list[StageRecord]:
        return [StageRecord(**s) for s in self.data.get("stages", [])]

    def write(self, **entries: Any) -> None:
        self.data.update(entries)
        atomic_write_text(self.path, json.dumps(plain(self.data), indent=2) + "\n")


def _settings(
    source: str | None,
    target: float,
    stages: int,
    epochs: int,
    method: str,
    fit: str,
    seed: int,
    lr: float,
    calibrate_batches: int,
    teacher: str | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    return {
        "model": source,
        "model_sha256": file_sha256(source) if source and Path(source).is_file() else None,
        "teacher": teacher,
        "target": target,
        "stages": stages,
        "epochs_per_stage": epochs,
        "method": method,
        "fit": fit,
        "seed": seed,
        "lr": lr,
        "calibrate_batches": calibrate_batches,
        "train_options": dict(options),
    }


def _source_of(model: nn.Module | PathLike) -> str | None:
    if isinstance(model, nn.Module):
        return model_meta(model).get("source_path")
    return str(Path(model).resolve())


def compress_in_stages(
    model: nn.Module | PathLike,
    data: str | DataBundle,
    target_macs: float | int | str,
    *,
    output: PathLike,
    stages: int = STAGES,
    epochs_per_stage: int = EPOCHS_PER_STAGE,
    teacher: nn.Module | PathLike | None = None,
    arch: str | Mapping[str, Any] | None = None,
    method: str = STAGED_METHOD,
    fit: str = "outputs",
    resume: bool = False,
    input_size: Sequence[int] | None = None,
    calibrate_batches: int = CALIBRATION_BATCHES,
    lr: float = FINETUNE_LR,
    batch_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    train_subset: int | None = None,
    val_split: float | int | None = None,
    preprocessing: Preprocessing | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    max_stages_this_run: int | None = None,
    on_stage: Callable[[StageRecord], None] | None = None,
    stage: Stage = no_stage,
    **train_options: Any,
) -> StagedResult:
    """Compress ``model`` to ``target_macs`` in ``stages`` rounds of decomposition, batch-norm
    re-estimation and distillation (see the module docstring).

    Args:
        model: the model, or its file (:func:`decomp.load`).
        data: a data spec or :class:`DataBundle`: training batches for the output-aware fit,
            the calibration and the fine-tuning; validation for the kept epoch; test reported.
        target_macs: the final MACs: a fraction of the model's (0.1), or a count ("3.7M").
        output: the final decomp file; the other stages' files and the state go beside it.
        stages: how many stages (>= 1); stage k keeps ``target ** (k / stages)`` of the MACs.
        epochs_per_stage: fine-tuning epochs after each stage (0: calibration only).
        teacher: the model (or file) to distil from; default ``model`` itself.
        arch: the architecture reference (``"module:factory"``) for a model that carries
            none (one that was not loaded from a decomp file); the stage files need it.
        method: the plan's method ("auto": Tucker-2 for kxk convs, SVD for the rest).
        fit: "outputs" (fit each layer's outputs on training batches) or "weights".
        resume: continue the run whose state is ``OUTPUT.stages.json`` (it must exist and have
            the same settings); without it, an existing state is an error.
        input_size: ``(C, H, W)``; default: what the model's file records, else (3, 32, 32).
        calibrate_batches: batches for the batch-norm re-estimation (0: none).
        lr: peak fine-tuning learning rate (cosine).
        batch_size, seed, workers, train_subset, val_split: as in :func:`finetune`.
        preprocessing: how a data spec's images are read; default what the model's file
            records (as :func:`finetune` does), else the data's own.
        device: where to train; default CUDA when available, else the CPU.
        progress: rich progress bars while fine-tuning.
        max_stages_this_run: stop after this many stages in this call (a later call with
            ``resume=True`` continues).
        on_stage: called with each stage's record once the stage is done.
        stage: wraps the slow steps (``stage("stage 2/3: planning")``), e.g. with a spinner.
        **train_options: further :class:`decomp.train.TrainConfig` fields for fine-tuning.

    Returns:
        A :class:`StagedResult`.

    Raises:
        ValueError: bad settings, a state that does not match, or nothing to resume.
    """
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; expected one of {sorted(FITS)}")
    if epochs_per_stage < 0:
        raise ValueError(f"epochs_per_stage must be >= 0; got {epochs_per_stage}")
    if max_stages_this_run is not None and max_stages_this_run < 1:
        raise ValueError(f"max_stages_this_run must be >= 1; got {max_stages_this_run}")
    stage_budgets(0.5, stages)  # checks stages before any loading
    source = _source_of(model)
    check_output_path(output, source)
    _State.check(state_path(output), resume)
    net = as_model(model)
    arch_ref = arch or model_arch(net)
    if arch_ref is None:
        raise ValueError(
            "the model carries no architecture reference, so its stages cannot be saved as "
            "decomp files: pass arch='module:factory' (or a model loaded from a decomp file)"
        )
    teacher_source = None if teacher is None else _source_of(teacher)
    teacher_net = net if teacher is None else as_model(teacher)
    size = list(input_size or recorded_input_size(net) or DEFAULT_INPUT_SIZE)
    dev = pick_device(device, notice="compressing on the CPU")
    prep = preprocessing or recorded_preprocessing(net)
    bundle = load_bundle(data, size, batch_size, seed, workers, train_subset, val_split, prep)
    original_macs = count_macs(net, size)
    target = _target_fraction(target_macs, original_macs)
    budgets = stage_budgets(target, stages)
    settings = _settings(
        source,
        target,
        stages,
        epochs_per_stage,
        method,
        fit,
        seed,
        lr,
        calibrate_batches,
        teacher_source,
        train_options,
    )
    state, resumed = _State.open(state_path(output), settings, resume)
    if "original" not in state.data:
        with stage("scoring the original model"):
            scores = quick_scores(net.to(dev), bundle)
        original = {"macs": original_macs, "params": count_params(net), **scores}
        state.write(original=original, budgets=budgets, stages=[], status="running")
    plain_bundle = without_augmentation(bundle, seed)  # fit and calibrate on the images as they are
    run = _Run(
        net,
        teacher_net.to(dev),
        bundle,
        size,
        dev,
        state,
        stage_paths(output, stages),
        arch_ref,
        budgets,
        original_macs,
        epochs_per_stage,
        method,
        fit,
        calibrate_batches,
        {"lr": lr, "seed": seed, **train_options},
        stage,
        progress,
        plain_bundle.train_loader,
    )
    records = state.stages
    last = stages if max_stages_this_run is None else len(records) + max_stages_this_run
    for k in range(len(records) + 1, min(stages, last) + 1):
        records.append(run.stage(k))
        state.write(stages=[r.to_dict() for r in records], current=None)
        if on_stage is not None:
            on_stage(records[-1])
    finished = len(records) == stages
    if finished:
        state.write(status="done")
    return StagedResult(
        model=run.load(run.files[len(records) - 1]) if records else net,
        output=str(run.files[-1]) if finished else None,
        finished=finished,
        stages=records,
        original=state.data["original"],
        settings=state.data["settings"],
        state=str(state.path),
        resumed=resumed,
        budgets=budgets,
    )


def _target_fraction(target: float | int | str, original_macs: int) -> float:
    """A MACs target as a fraction of the original model's MACs (a fraction as given)."""
    count = parse_macs_target(target, original_macs)
    if count > original_macs:
        raise ValueError(
            f"target MACs {count:,} exceed the model's {original_macs:,}; ask for fewer "
            "(a fraction like 0.1, or a count below the model's)"
        )
    with contextlib.suppress(TypeError, ValueError):
        if not isinstance(target, int) and not str(target).strip().isdigit():
            if 0 < float(target) <= 1:
                return float(target)
    return count / original_macs


@dataclass
class _Run:
    """The settings of one staged run, and one stage at a time against its state."""

    original: nn.Module
    teacher: nn.Module
    bundle: DataBundle
    size: list[int]
    device: torch.device
    state: _State
    files: list[Path]
    arch: str | Mapping[str, Any]
    budgets: list[float]
    original_macs: int
    epochs: int
    method: str
    fit: str
    calibrate_batches: int
    options: dict[str, Any]
    wrap: Stage
    progress: bool
    fit_loader: Any  # the training batches, not augmented: what plans fit and BN calibrates on

    def load(self, path: Path) -> nn.Module:
        return load(path).to(self.device)

    def stage(self, k: int) -> StageRecord:
        """Stage ``k``: its decomposed and calibrated start (made now, or read back when an
        earlier call made it), then its fine-tuning (resumed when it was under way)."""
        n, path = len(self.files), self.files[k - 1]
        start_file = _start_path(self.files[-1], k)
        current = self.state.data.get("current")
        resuming = bool(current and current["stage"] == k and start_file.exists())
        if resuming:
            logger.info("stage %d/%d: resuming from %s", k, n, start_file)
        else:
            current = self._decompose(k, start_file)
        clock = time.perf_counter()
        with self.wrap(f"stage {k}/{n}: fine-tuning for {self.epochs} epoch(s)"):
            outcome = finetune(
                self.load(start_file),
                self.bundle,
                teacher=self.teacher,
                epochs=self.epochs,
                output=path,
                resume=resuming,
                input_size=self.size,
                device=self.device,
                progress=self.progress,
                extra={"staged": {"stage": k, "stages": n, "budget": self.budgets[k - 1]}},
                **{**self.options, "seed": self.options["seed"] + k},
            )
        start_file.unlink(missing_ok=True)
        seconds = {**current["seconds"], "finetune": round(time.perf_counter() - clock, 3)}
        seconds["total"] = round(sum(seconds.values()), 3)
        record = StageRecord(
            stage=k,
            budget=self.budgets[k - 1],
            target_macs=current["target_macs"],
            macs=current["macs"],
            params=current["params"],
            rank=current["rank"],
            factorized=current["factorized"],
            val_f1_calibrated=current["val_f1"],
            test_f1_calibrated=current["test_f1"],
            val_f1=outcome.best_val_f1,
            test_f1=(outcome.test or {}).get("f1"),
            best_epoch=outcome.best_epoch,
            epochs=self.epochs,
            seconds=seconds,
            load=_load_average(),
            path=str(path),
        )
        logger.info(
            "stage %d/%d: %.2fx fewer MACs, val F1 %.4f calibrated, %.4f fine-tuned",
            k,
            n,
            self.original_macs / record.macs,
            record.val_f1_calibrated,
            record.val_f1,
        )
        return record

    def _decompose(self, k: int, start_file: Path) -> dict[str, Any]:
        """Plan stage ``k``'s budget over the previous stage's model, factorize, calibrate,
        score, write the start file and record the stage as under way in the state."""
        n, budget = len(self.files), self.budgets[k - 1]
        previous = self.original if k == 1 else self.load(self.files[k - 2])
        loader, seed = self.fit_loader, self.options["seed"] + k
        count = int(budget * self.original_macs)
        clock = time.perf_counter()
        with self.wrap(f"stage {k}/{n}: planning {budget:.3g} of the MACs and factorizing"):
            seed_loader(loader, seed)  # the same fitting batches in every run
            data = loader if self.fit == "outputs" else None
            p = make_plan(previous, self.method, input_size=self.size, target_macs=count, data=data)
            compressed = apply(previous, p)
        planned = time.perf_counter() - clock
        clock = time.perf_counter()
        with self.wrap(f"stage {k}/{n}: calibrating batch norm and scoring"):
            if self.calibrate_batches:
                seed_loader(loader, seed)
                calibrate(compressed, loader, batches=self.calibrate_batches)
            scores = quick_scores(compressed, self.bundle)
        extra = {"bn_calibrated": bool(self.calibrate_batches), "staged": {"stage": k}}
        save(compressed, start_file, arch=self.arch, input_size=self.size, extra=extra)
        current = {
            "stage": k,
            "target_macs": count,
            "macs": count_macs(compressed, self.size),
            "params": count_params(compressed),
            "rank": p.rank,
            "factorized": len(p.decomposed),
            "val_f1": scores["val_f1"],
            "test_f1": scores["f1"],
            "seconds": {
                "plan": round(planned, 3),
                "calibrate": round(time.perf_counter() - clock, 3),
            },
        }
        self.state.write(current=current)
        return current
