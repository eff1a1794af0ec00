"""The commands that train or measure: ``train``, ``finetune``, ``evaluate`` and ``demo``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from decomp import checkpoint
from decomp._utils import parse_input_size
from decomp.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    DataOpt,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    ModelOutputOpt,
    NormalizeOpt,
    ResizeOpt,
    StdOpt,
    TrustPickleOpt,
    ValSplitOpt,
    VerboseOpt,
    add_cwd_to_path,
    command,
    err,
    input_size_of,
    load_model,
    method_option,
    out,
    preprocessing_options,
    print_json,
    say,
    val_split_count,
)
from decomp.cli.render import demo_table, evaluation_table
from decomp.data import (
    load_data,
)
from decomp.demo import (
    DEFAULT_RECIPE,
    DEMO_METHOD,
    DEMO_OUTPUT_DIR,
    RECIPES,
    TARGET_MACS_RATIO,
    run_demo,
)
from decomp.distributed import is_main_process
from decomp.evaluate import evaluate
from decomp.metrics import BASELINE_F1, BASELINE_MACS
from decomp.recipes import (
    BASELINE_EPOCHS,
    CALIBRATION_BATCHES,
    DEFAULT_ARCH,
    DEFAULT_BASELINE_OUTPUT,
    DEFAULT_DATA,
    DEFAULT_INPUT_SIZE,
    FINETUNE_EPOCHS,
    finetune,
    train_baseline,
)
from rank_selection import parse_rank_spec

EpochsOpt = Annotated[int, typer.Option("--epochs", min=0, help="Training epochs.")]
_INPUT_SIZE_TEXT = ",".join(map(str, DEFAULT_INPUT_SIZE))
Recipe = StrEnum("Recipe", {name: name for name in RECIPES})
_DEFAULT_RECIPE = Recipe(DEFAULT_RECIPE)


def _report(record: dict, test: dict | None, json_output: bool, title: str, path: Path) -> None:
    if json_output:
        print_json(record)
        return
    if test is not None:
        out.print(evaluation_table(test, title=f"{title}: test split"))
    say(f"wrote {path}")


def train_command(
    arch: Annotated[
        str, typer.Option("--arch", metavar="MODULE:FACTORY", help="The model to train.")
    ] = DEFAULT_ARCH,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = DEFAULT_DATA,
    epochs: EpochsOpt = BASELINE_EPOCHS,
    input_size: Annotated[
        str,
        typer.Option("--input-size", metavar="C,H,W", help="Input size of one image."),
    ] = _INPUT_SIZE_TEXT,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="PATH", help=f"Default: {DEFAULT_BASELINE_OUTPUT}."),
    ] = None,
    normalize: NormalizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    val_split: ValSplitOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train a baseline from scratch and save it as a decomp file.

    The file records the input size, the class names and the preprocessing.
    """
    with command(verbose):
        size = parse_input_size(input_size)
        prep = preprocessing_options(None, normalize, mean, std, resize)
        if output is None:
            output = Path(DEFAULT_BASELINE_OUTPUT)
            output.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.check_output_path(output)
        add_cwd_to_path()
        outcome = train_baseline(
            arch,
            arch_kwargs,
            data,
            size,
            epochs,
            output,
            val_split=val_split_count(val_split),
            progress=not json_output,
            preprocessing=prep,
        )
        _report(outcome.to_dict(), outcome.test, json_output, f"trained {arch}", output)


def finetune_command(
    model: ModelArg,
    data: DataOpt = DEFAULT_DATA,
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", metavar="ORIGINAL", help="Distil from this model (KD)."),
    ] = None,
    epochs: EpochsOpt = FINETUNE_EPOCHS,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="PATH", help="Default: <stem>_ft.pt."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint of a killed run.")
    ] = False,
    calibrate_batches: Annotated[
        int,
        typer.Option(
            "--calibrate-batches",
            min=0,
            help="Re-estimate batch-norm statistics on this many batches before training, "
            "unless the file says that was done.",
        ),
    ] = CALIBRATION_BATCHES,
    normalize: NormalizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    val_split: ValSplitOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune a (decomposed) model from its own weights; distil from --teacher if given.

    Under torchrun (``torchrun --nproc_per_node N -m decomp finetune ...``) every process trains
    its shard of the data and rank 0 writes the file.
    """
    with command(verbose):
        checkpoint.check_input_path(model)
        target = output or model.with_name(f"{model.stem}_ft.pt")
        checkpoint.check_output_path(target, source=model)
        net = load_model(model, arch, arch_kwargs, trust_pickle)
        size = input_size_of(None, net, model)
        teacher_net = None if teacher is None else load_model(teacher, None, None, trust_pickle)
        outcome = finetune(
            net,
            data,
            teacher=teacher_net,
            epochs=epochs,
            output=target,
            resume=resume,
            input_size=size,
            val_split=val_split_count(val_split),
            progress=not json_output,
            calibrate_batches=calibrate_batches,
            preprocessing=preprocessing_options(net, normalize, mean, std, resize),
        )
        if is_main_process():  # under torchrun, rank 0 wrote the file and reports
            _report(outcome.to_dict(), outcome.test, json_output, f"fine-tuned {model}", target)


def evaluate_command(
    model: ModelArg,
    data: DataOpt = DEFAULT_DATA,
    input_size: InputSizeOpt = None,
    latency: Annotated[
        bool, typer.Option("--latency/--no-latency", help="Time batch 1 and 64 forwards.")
    ] = True,
    compare_with: Annotated[
        Path | None,
        typer.Option(
            "--compare-with",
            metavar="ORIGINAL",
            help="The original model (a decomp file): report the speed-up over it, timed "
            "paired (back to back, interleaved, median and spread).",
        ),
    ] = None,
    baseline_macs: Annotated[
        int, typer.Option("--baseline-macs", help="Competition score: the baseline's MACs.")
    ] = BASELINE_MACS,
    baseline_f1: Annotated[
        float, typer.Option("--baseline-f1", help="Competition score: the baseline's F1.")
    ] = BASELINE_F1,
    normalize: NormalizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    val_split: ValSplitOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    model_output: ModelOutputOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Macro F1, accuracy, per-class F1, MACs (thop and ptflops), params, latency, score."""
    with command(verbose):
        size = parse_input_size(input_size)
        checkpoint.check_input_path(model)
        net = load_model(model, arch, arch_kwargs, trust_pickle)
        size = input_size_of(size, net, model)
        prep = preprocessing_options(net, normalize, mean, std, resize)
        bundle = load_data(data, size, val_split=val_split_count(val_split), preprocessing=prep)
        metrics = evaluate(
            net,
            bundle,
            size,
            latency=latency,
            compare_with=None
            if compare_with is None
            else load_model(compare_with, None, None, trust_pickle),
            baseline_macs=baseline_macs,
            baseline_f1=baseline_f1,
            output=model_output,
        )
        if json_output:
            print_json(metrics)
        else:
            out.print(evaluation_table(metrics, title=f"{model} on {data}"))


class _DemoBars:
    """The demo's stages as rich progress bars on stderr (on a terminal): one bar per stage as
    it starts, with its elapsed time and the time left at its current pace."""

    def __init__(self, shown: bool) -> None:
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=err,
            disable=not (shown and err.is_terminal),
        )
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(f"{stage.replace('_', ' '):<28}", total=total)
        self.bars.update(self.tasks[stage], completed=done, total=total)


def _demo_lines(results: dict[str, Any]) -> list[str]:
    """Where the time went, and the targets, met or not."""
    timings, summary = results["timings"], results["summary"]
    stages = ", ".join(
        f"{k.replace('_', ' ')} {v:.0f} s" for k, v in timings.items() if k != "total"
    )
    met = [
        f"{k.replace('_', ' ').replace('f1', 'F1').replace('macs', 'MACs')}: "
        + ("met" if v else "NOT met")
        for k, v in summary["targets"].items()
    ]
    return [f"{timings['total'] / 60:.1f} min in all ({stages})", "targets: " + "; ".join(met)]


def demo_command(
    output_dir: Annotated[Path, typer.Option("--output-dir", metavar="DIR")] = Path(
        DEMO_OUTPUT_DIR
    ),
    recipe: Annotated[
        Recipe,
        typer.Option(
            "--recipe",
            help="; ".join(f"{r.name}: {r.about}" for r in RECIPES.values()) + ".",
        ),
    ] = _DEFAULT_RECIPE,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=0, help="Baseline epochs (default: the recipe's)."),
    ] = None,
    finetune_epochs: Annotated[
        int | None,
        typer.Option(
            "--finetune-epochs", min=0, help="Distillation epochs (default: the recipe's)."
        ),
    ] = None,
    method: Annotated[str, method_option("tucker, cp, svd, auto or a registered method.")] = (
        DEMO_METHOD
    ),
    rank: Annotated[
        str | None,
        typer.Option(
            "--rank", metavar="SPEC", help="Tucker-2 ranks instead of the recipe's MACs budget."
        ),
    ] = None,
    target_macs: Annotated[
        float | None,
        typer.Option(
            "--target-macs",
            metavar="F",
            min=0.0,
            max=1.0,
            help=f"MACs budget, a fraction of the baseline's (default: {TARGET_MACS_RATIO:g}).",
        ),
    ] = None,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train the baseline again even if one is cached.")
    ] = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fashion-MNIST end to end: train (or reuse) ResNet-18, decompose, calibrate, fine-tune.

    The quick recipe is planned to finish within 15 minutes on an idle 2-core machine; results
    (with the time and CPU time of every stage, the machine's load and the targets, met or not)
    go to OUTPUT_DIR/results.json.
    """
    with command(True if not json_output else verbose):
        if rank is not None:
            parse_rank_spec(rank)
        bars = _DemoBars(shown=not json_output)
        with bars.bars:
            results: dict[str, Any] = run_demo(
                output_dir,
                epochs,
                finetune_epochs,
                rank,
                method,
                recipe=recipe.value,
                retrain=retrain,
                progress=bars,
                **({} if target_macs is None else {"target_macs": target_macs}),
            )
        if json_output:
            print_json(results)
        else:
            out.print(demo_table(results))
            for line in _demo_lines(results):
                say(line)
            say(f"results in {Path(output_dir) / 'results.json'}")
