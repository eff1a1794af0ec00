"""``decomp compress``: multi-stage compression down to a MACs target (decomposition, batch-norm
re-estimation and distillation, N times; see :mod:`decomp.recipes.staged`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from decomp import checkpoint
from decomp._utils import parse_input_size
from decomp.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    Fit,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    NormalizeOpt,
    ResizeOpt,
    StdOpt,
    TrustPickleOpt,
    ValSplitOpt,
    VerboseOpt,
    command,
    err,
    input_size_of,
    load_model,
    method_option,
    out,
    preprocessing_options,
    print_json,
    say,
    status,
    val_split_count,
)
from decomp.cli.render import staged_lines, staged_stage_line, staged_table
from decomp.plan.budget import parse_macs_target
from decomp.recipes import (
    EPOCHS_PER_STAGE,
    STAGED_METHOD,
    STAGES,
    StagedResult,
    compress_in_stages,
)


def compress_command(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            metavar="DATA",
            show_default=False,
            help="Training data: fashion-mnist, fashion-mnist:DIR, or an ImageFolder directory "
            "(train/ and val/). Its training batches fit the layers' outputs, re-estimate batch "
            "norm and fine-tune; validation picks each stage's epoch; test is reported.",
        ),
    ],
    target_macs: Annotated[
        str,
        typer.Option(
            "--target-macs",
            metavar="X",
            show_default=False,
            help="The final MACs: a fraction of MODEL's (0.1) or a count (3.7M, 3700000).",
        ),
    ],
    stages: Annotated[
        int,
        typer.Option(
            "--stages",
            min=1,
            help="Stages; stage k keeps X^(k/N) of the MACs, the budget re-spent over the "
            "model the previous stage left.",
        ),
    ] = STAGES,
    epochs_per_stage: Annotated[
        int,
        typer.Option("--epochs-per-stage", min=0, help="Distillation epochs after each stage."),
    ] = EPOCHS_PER_STAGE,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher", metavar="ORIGINAL", help="Distil from this model. Default: MODEL."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="The final model. Default: beside MODEL, <stem>_staged.pt. The other stages' "
            "files (PATH's stem + .stage<k>.pt) and the state (PATH.stages.json) go beside it.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a killed run from PATH.stages.json."),
    ] = False,
    method: Annotated[
        str,
        method_option("auto: Tucker-2 for kxk convs, SVD for the rest."),
    ] = STAGED_METHOD,
    fit: Annotated[
        Fit,
        typer.Option(
            "--fit",
            help="outputs: fit each layer's outputs on training batches; weights: the kernels.",
        ),
    ] = Fit.outputs,
    input_size: InputSizeOpt = None,
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
    """Compress a model to a MACs target in stages: decompose, calibrate, distil, repeat."""
    target = output
    try:
        with command(verbose):
            size = parse_input_size(input_size)
            parse_macs_target(target_macs, 1)  # the form, before anything is loaded
            checkpoint.check_input_path(model)
            if teacher is not None:
                checkpoint.check_input_path(teacher)
            target = output or model.with_name(f"{model.stem}_staged.pt")
            checkpoint.check_output_path(target, source=model)
            net = load_model(model, arch, arch_kwargs, trust_pickle)
            size = input_size_of(size, net, model)
            prep = preprocessing_options(net, normalize, mean, std, resize)
            teacher_net = None if teacher is None else load_model(teacher, None, None, trust_pickle)
            shown = None if json_output else (lambda record: say(staged_stage_line(record)))
            result: StagedResult = compress_in_stages(
                net,
                data,
                target_macs,
                output=target,
                stages=stages,
                epochs_per_stage=epochs_per_stage,
                teacher=teacher_net,
                method=method,
                fit=fit.value,
                resume=resume,
                input_size=size,
                val_split=val_split_count(val_split),
                preprocessing=prep,
                progress=not json_output,
                on_stage=shown,
                stage=status,
            )
            if json_output:
                print_json(result.to_dict())
                return
            out.print(staged_table(result))
            for line in staged_lines(result):
                say(line)
    except typer.Exit as exc:
        if exc.exit_code == 130:  # interrupted: the finished stages are kept
            err.print(f"the stages done so far are kept; continue with --resume -o {target}")
        raise
