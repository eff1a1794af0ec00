"""The commands that work on a model file: ``decompose``, ``inspect`` and ``export``."""

from __future__ import annotations

import contextlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from decomp import checkpoint
from decomp._utils import parse_input_size
from decomp.arch import describe_arch
from decomp.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    Fit,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    ModelOutputOpt,
    NormalizeOpt,
    RankOpt,
    ResizeOpt,
    StdOpt,
    TrustPickleOpt,
    VerboseOpt,
    command,
    forward_hint,
    input_size_of,
    load_model,
    method_option,
    out,
    preprocessing_options,
    print_json,
    progress_bar,
    say,
    status,
)
from decomp.cli.latency import (
    BatchOpt,
    Device,
    DeviceOpt,
    Runtime,
    RuntimeOpt,
    TableOpt,
    ThreadsOpt,
    table_path,
)
from decomp.cli.render import inspect_table, methods_table, num, plan_table, size_text, totals_line
from decomp.export import export
from decomp.factorize import reporting_sweeps
from decomp.plan import Plan, method_choices
from decomp.recipes import (
    CALIBRATION_BATCHES,
    DEFAULT_METHOD,
    DEFAULT_RANK,
    CompressResult,
    compress,
    inspect_model,
)
from rank_selection import parse_rank_spec


class ExportFormat(StrEnum):
    onnx = "onnx"
    torchscript = "torchscript"


# ---------------------------------------------------------------------------- decompose


def _read_plan_file(path: Path) -> Plan:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"--plan {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ValueError(f"--plan {path}: not a plan JSON file ({exc})") from None
    try:
        return Plan.from_json(text)
    except ValueError as exc:
        raise ValueError(f"--plan {path}: {exc}") from None


def _check_plan_conflicts(**given: Any) -> None:
    clash = [f"--{name.replace('_', '-')}" for name, value in given.items() if value]
    if clash:
        raise ValueError(
            f"--plan fixes every layer's method and ranks, so {', '.join(clash)} cannot be "
            "combined with it; edit the plan file instead"
        )


class PlanDisplay:
    """Renders :func:`decomp.recipes.compress` as it goes: the plan table once the plan is made,
    then a progress bar over the layers, closed after the last one (before calibration); CP
    layers show their ALS sweep and relative error as they go."""

    def __init__(self, json_output: bool, dry_run: bool) -> None:
        self.json_output, self.dry_run = json_output, dry_run
        self.bar: Any = None
        self.stack = contextlib.ExitStack()

    def plan(self, p: Plan) -> None:
        if not self.json_output:
            title = f"{p.method} plan, rank {p.rank}, input {size_text(p.input_size)}"
            out.print(plan_table(p, title=title))
        self.names = [lp.name for lp in p.decomposed]
        if self.names and not self.dry_run:
            self.bar = self.stack.enter_context(progress_bar())
            self.bar.add_task(f"{p.method}: {self.names[0]}", total=len(self.names))
            self.method = p.method
            self.stack.enter_context(reporting_sweeps(self.sweep))

    def _current(self) -> str:
        done = int(self.bar.tasks[0].completed)
        return self.names[done] if done < len(self.names) else "done"

    def step(self, name: str) -> None:
        self.bar.update(self.bar.task_ids[0], advance=1)
        self.bar.update(self.bar.task_ids[0], description=f"{self.method}: {self._current()}")
        if self.bar.tasks[0].completed == len(self.names):
            self.stack.close()

    def sweep(self, sweep: int, error: float) -> None:
        text = f"{self.method}: {self._current()}, CP sweep {sweep}, error {error:.4f}"
        self.bar.update(self.bar.task_ids[0], description=text)


def _calibration_line(done: dict[str, int]) -> str:
    """'re-estimated 3 batch-norm layers on 29 images (1 batch of 30 asked for)'."""
    if not done["layers"]:
        return "no batch-norm layers: nothing to calibrate"
    batches, asked = done["batches"], done["batches_asked"]
    used = f"{batches} batch{'es' if batches != 1 else ''}"
    used += f" of {asked} asked for" if batches < asked else ""
    return f"re-estimated {done['layers']} batch-norm layers on {done['images']} images ({used})"


def _show_result(result: CompressResult, json_output: bool, dry_run: bool) -> None:
    p = result.plan
    if dry_run and json_output:
        print_json(p.to_dict())
    elif result.status == "nothing_to_decompose":
        message = (
            f"nothing to decompose: all {len(p.layers)} layers are skipped under {p.method} at "
            f"rank {p.rank} (reasons in the table); no file written"
        )
        record = result.to_dict()
        plan = record.pop("plan")
        if json_output:
            print_json({**record, "message": message, "plan": plan})
        else:
            say(message)
    elif result.status == "dry_run":
        macs, params = (p.model_macs, p.macs_after), (p.model_params, p.params_after)
        say(totals_line(macs, params, len(p.decomposed), len(p.layers)))
        say("dry run: nothing written")
    elif json_output:
        print_json(result.to_dict())
    else:
        if result.calibration is not None:
            say(_calibration_line(result.calibration))
        macs = (result.macs_before or 0, result.macs_after or 0)
        params = (result.params_before or 0, result.params_after or 0)
        say(totals_line(macs, params, len(p.decomposed), len(p.layers)))
        written = Path(str(result.output))
        say(f"wrote {written} ({_size_mb(written)}) in {result.seconds or 0:.1f} s")


def _size_mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def decompose_command(
    model: ModelArg,
    method: Annotated[
        str | None,
        method_option(
            "tucker (kxk convs), cp (kxk convs), svd (linear and 1x1 convs), another registered "
            "method, or auto (tucker for kxk, svd for the rest). Default: tucker.",
            show_default=False,
        ),
    ] = None,
    rank: RankOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output file. Default: beside MODEL, <stem>_<method>.pt.",
            show_default=False,
        ),
    ] = None,
    input_size: InputSizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            metavar="GLOB",
            help="Leave layers whose qualified name matches GLOB alone (repeatable), e.g. 'fc' "
            "or 'layer4.*'.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and write nothing.")
    ] = False,
    plan_file: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            metavar="FILE",
            help="Apply a saved (possibly hand-edited) plan JSON, as printed by --dry-run --json.",
        ),
    ] = None,
    json_output: JsonOpt = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Factorize layers even where that would not cut MACs."),
    ] = False,
    target_macs: Annotated[
        str | None,
        typer.Option(
            "--target-macs",
            metavar="X",
            help="A MACs budget for the whole model: a fraction of its MACs (0.2) or a count "
            "(5M, 5000000). Ranks are allocated across layers; --rank is not used.",
        ),
    ] = None,
    target_latency: Annotated[
        str | None,
        typer.Option(
            "--target-latency",
            metavar="X",
            help="A latency budget: a fraction of the measured latency (0.5) or a time (3ms), "
            "on --runtime at --batch. Layers are timed once (see decomp profile) and the "
            "result is checked by timing it paired with the original.",
        ),
    ] = None,
    runtime: RuntimeOpt = Runtime.torch,
    device: DeviceOpt = Device.cpu,
    batch: BatchOpt = 1,
    threads: ThreadsOpt = None,
    latency_table: TableOpt = None,
    weigh_layers: Annotated[
        bool,
        typer.Option(
            "--weigh-layers",
            help="With --target-macs and --data: weight each layer's estimated error by the "
            "output damage measured on 4 training batches (slower; see docs/budget.md for how "
            "it compares).",
        ),
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            metavar="DATA",
            help="Calibration data: fashion-mnist, fashion-mnist:DIR, or an ImageFolder "
            "directory (its train/ images, or all images of its class folders; no val/ "
            "needed). The layers are fitted to their outputs on it (see --fit) and batch norm "
            "is re-estimated on the same batches, read as --normalize and --resize say.",
        ),
    ] = None,
    fit: Annotated[
        Fit | None,
        typer.Option(
            "--fit",
            help="With --data: fit each layer's outputs on the data (outputs, the default) or "
            "its weights alone (weights, the default without --data).",
            show_default=False,
        ),
    ] = None,
    normalize: NormalizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resize: ResizeOpt = None,
    calibrate_batches: Annotated[
        int,
        typer.Option(
            "--calibrate-batches",
            min=0,
            help="With --data: re-estimate batch-norm statistics on this many training batches "
            "after decomposing (no training).",
        ),
    ] = CALIBRATION_BATCHES,
    verbose: VerboseOpt = False,
) -> None:
    """Decompose a model's layers and save the compressed model as a decomp file."""
    with command(verbose):
        size = parse_input_size(input_size)
        fixed = None
        if plan_file is not None:
            _check_plan_conflicts(
                method=method,
                rank=rank,
                exclude=exclude,
                force=force,
                target_macs=target_macs,
                target_latency=target_latency,
                fit=fit,
            )
            fixed = _read_plan_file(plan_file)
        else:
            parse_rank_spec(rank or DEFAULT_RANK)
        if target_macs is not None and target_latency is not None:
            raise ValueError("give --target-macs or --target-latency, not both")
        if weigh_layers and not (target_macs and data):
            raise ValueError("--weigh-layers needs --target-macs and --data")
        _check_data_options(data, fit, normalize, mean, std, resize)
        checkpoint.check_input_path(model)
        name = fixed.method if fixed else (method or DEFAULT_METHOD)
        target = None
        if not dry_run:
            target = output or model.with_name(f"{model.stem}_{name}.pt")
            checkpoint.check_output_path(target, source=model)
        net = load_model(model, arch, arch_kwargs, trust_pickle)
        if fixed is None:
            size = input_size_of(size, net, model)
        prep = preprocessing_options(net, normalize, mean, std, resize)
        shown = PlanDisplay(json_output, dry_run)
        with shown.stack:
            result = forward_hint(
                lambda: compress(
                    net,
                    target,
                    method=name,
                    rank=rank or DEFAULT_RANK,
                    input_size=size,
                    exclude=exclude or [],
                    force=force,
                    target_macs=target_macs,
                    latency=_latency_options(
                        target_latency, runtime, device, batch, threads, latency_table
                    ),
                    plan=fixed,
                    data=data,
                    fit=None if fit is None else fit.value,
                    preprocessing=prep,
                    weigh_layers=weigh_layers,
                    calibrate_batches=calibrate_batches,
                    dry_run=dry_run,
                    on_plan=shown.plan,
                    progress=shown.step,
                    stage=status,
                    source=model,
                ),
                size or fixed.input_size,
            )
        _show_result(result, json_output, dry_run)


def _check_data_options(data: str | None, fit: Fit | None, *read: object) -> None:
    """Options that need --data fail without it, before any work."""
    if data:
        return
    if fit is Fit.outputs:
        raise ValueError("--fit outputs fits the layers' outputs on calibration data; pass --data")
    if any(option is not None for option in read):
        raise ValueError(
            "--normalize, --mean, --std and --resize say how --data is read; pass --data"
        )


def _latency_options(
    target: str | None,
    runtime: Runtime,
    device: Device,
    batch: int,
    threads: int | None,
    table: Path | None,
) -> dict[str, Any] | None:
    """decompose's latency options as :func:`decomp.plan` keywords (None without a target)."""
    if target is None:
        return None
    return {
        "target_latency": target,
        "runtime": runtime.value,
        "device": device.value,
        "batch": batch,
        "threads": threads,
        "latency_table": table_path(table, runtime.value, device.value, batch, threads),
    }


# ------------------------------------------------------------------------------ inspect


def inspect_command(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    rank: RankOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show each layer's MACs and params and what every method would do to it."""
    with command(verbose):
        size = parse_input_size(input_size)
        spec = str(parse_rank_spec(rank or DEFAULT_RANK))
        checkpoint.check_input_path(model)
        net = load_model(model, arch, arch_kwargs, trust_pickle)
        size = input_size_of(size, net, model)
        report = forward_hint(
            lambda: inspect_model(net, size, spec, method_choices(), stage=status), size
        )
        plans = report.pop("plans")
        summary = {"model": str(model), **report}
        if json_output:
            print_json({**summary, "plans": {m: p.to_dict() for m, p in plans.items()}})
            return
        ref = summary["arch"]
        arch_text = describe_arch(ref) if ref else "none (a pickle)"
        say(
            f"{model}: {summary['kind']} file, arch {arch_text}, input {size_text(size)}, "
            f"{summary['plans_applied']} plan(s) applied"
        )
        say(
            f"MACs {num(summary['macs'])} (thop), {num(summary['macs_competition'])} "
            f"(competition, ptflops); params {num(summary['params'])}; rank {spec}"
        )
        out.print(inspect_table(plans))
        out.print(methods_table(plans))


# ------------------------------------------------------------------------------- export


def export_command(
    model: ModelArg,
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="Output format.")
    ] = ExportFormat.onnx,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output file. Default: beside MODEL, <stem>.onnx or <stem>.torchscript.pt.",
            show_default=False,
        ),
    ] = None,
    input_size: InputSizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    model_output: ModelOutputOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Export a model to ONNX or TorchScript, checked against PyTorch (relative error < 1e-4)."""
    with command(verbose):
        size = parse_input_size(input_size)
        checkpoint.check_input_path(model)
        suffix = ".onnx" if format is ExportFormat.onnx else ".torchscript.pt"
        target = output or model.with_name(model.stem + suffix)
        checkpoint.check_output_path(target, source=model)
        net = load_model(model, arch, arch_kwargs, trust_pickle)
        size = input_size_of(size, net, model)
        with status(f"exporting to {format.value}"):
            error = forward_hint(
                lambda: export(net, target, format.value, size, output=model_output), size
            )
        runner = "onnxruntime" if format is ExportFormat.onnx else "torch.jit.load"
        check = (
            f"{runner} matches PyTorch (relative error {error:.1e})"
            if error is not None
            else "not verified (onnxruntime is not installed)"
        )
        say(f"wrote {target} ({_size_mb(target)}); {check}")
