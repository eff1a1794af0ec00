"""Command line: ``decomp decompose | inspect | export`` and the standalone ``decompose``.

Thin: every command parses its options, calls the library and renders the result with rich.
Adding a command: write a function whose parameters use the shared option types below, put its
body in ``with _command(verbose):`` and register it with ``app.command("name")(function)``.

Exit codes: 0 success; 1 any failure, reported as one line on stderr that says what is wrong and
how to mend it; 2 a malformed command line (unknown option, a value outside the choices, a missing
argument: typer's usage errors). Never a traceback, unless DECOMP_DEBUG=1 is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from torch import nn

from decomp import checkpoint
from decomp import pipeline as pipeline_defaults
from decomp.arch import describe_arch
from decomp.export import export
from decomp.metrics import count_macs, count_macs_competition, count_params
from decomp.plan import Plan, applied_plans, apply, plan, recount
from rank_selection import parse_rank_spec

DEBUG_ENV = "DECOMP_DEBUG"
DEFAULT_RANK = "vbmf"
_HANDLER_NAME = "decomp-cli"
_LOGGERS = ("decomp", "rank_selection")


def _make_console(stderr: bool = False) -> Console:
    """A rich console; 160 columns when not a terminal (pipes, logs) unless COLUMNS says."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160
    return console


out = _make_console()
err = _make_console(stderr=True)

_APP_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}
app = typer.Typer(
    name="decomp",
    help="Compress PyTorch CNNs by tensor decomposition (Tucker-2, CP, SVD; VBMF ranks).",
    no_args_is_help=True,
    **_APP_SETTINGS,
)


class Method(StrEnum):
    tucker = "tucker"
    cp = "cp"
    svd = "svd"
    auto = "auto"


class ExportFormat(StrEnum):
    onnx = "onnx"
    torchscript = "torchscript"


# ---------------------------------------------------------------------------- shared options

ModelArg = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        show_default=False,
        help="Model file: a decomp file, a state_dict (with --arch), or a whole pickled module "
        "(with --trust-pickle).",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="MODULE:FACTORY",
        help="Callable that builds the model, e.g. torchvision.models:resnet18 (needed for a "
        "state_dict). MODULE is imported from the Python path and the current folder.",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        metavar="JSON",
        help="""Keyword arguments for --arch, a JSON object, e.g. '{"num_classes": 9}'.""",
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow a whole pickled module (torch.save(model)). Unpickling runs code from the "
        "file: use it only for files you trust.",
    ),
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-size",
        metavar="C,H,W",
        help="Input size of one image, e.g. 3,32,32. Default: the one the file records.",
    ),
]
RankOpt = Annotated[
    str | None,
    typer.Option(
        "--rank",
        metavar="SPEC",
        help="Rank spec: vbmf, vbmf:WF (weakened), ratio:F, energy:E, an integer, or a float "
        f"in (0, 1]. Default: {DEFAULT_RANK}.",
        show_default=False,
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        metavar="DATA",
        help="fashion-mnist (the Debian package's files), fashion-mnist:DIR, or an ImageFolder "
        "directory (train/ and val/, one folder per class).",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log progress details (INFO) on stderr.")
]


# ------------------------------------------------------------------------------ plumbing


@contextlib.contextmanager
def _command(verbose: bool) -> Iterator[None]:
    """Set up logging; turn any failure into one line on stderr and exit code 1."""
    saved = _setup_logging(verbose)
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        err.print("interrupted; no output file was written", soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        _fail(exc)
    finally:
        _restore_logging(saved)


def _fail(exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    known = (ValueError, TypeError, OSError, RuntimeError, ImportError)
    if not isinstance(exc, known):
        message = f"{type(exc).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)"
    err.print(f"error: {message}", soft_wrap=True, markup=False)
    raise typer.Exit(1) from None


def _setup_logging(verbose: bool) -> list[tuple[logging.Logger, int, list[logging.Handler]]]:
    """Send the library's logs to a rich handler on stderr; return what to restore."""
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    handler.set_name(_HANDLER_NAME)
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, list(logger.handlers)))
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
    return saved


def _restore_logging(saved: list[tuple[logging.Logger, int, list[logging.Handler]]]) -> None:
    for logger, level, handlers in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers


def _add_cwd_to_path() -> None:
    """Let --arch name a module in the current folder, the way ``python -m`` would."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``"3,32,32"`` (or ``3x32x32``) to ``(3, 32, 32)``; None stays None."""
    if text is None:
        return None
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"bad --input-size {text!r}: expected C,H,W, three positive integers such as 3,32,32"
        )
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _load(path: Path, arch: str | None, arch_kwargs: str | None, trust: bool) -> nn.Module:
    _add_cwd_to_path()
    with _status(f"loading {path}"):
        return checkpoint.load(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust)


def _input_size(given: tuple[int, int, int] | None, model: nn.Module, path: Path) -> list[int]:
    """The --input-size, else the one the file records (metadata or last plan), else an error."""
    if given is not None:
        return list(given)
    meta = getattr(model, checkpoint.META_ATTR, None) or {}
    plans = applied_plans(model)
    size = meta.get("input_size") or (plans[-1].get("input_size") if plans else None)
    if size:
        logging.getLogger("decomp").info("input size %s, from %s", size, path)
        return list(size)
    raise ValueError(
        f"--input-size C,H,W is needed: {path} does not record the model's input size "
        "(e.g. --input-size 3,224,224)"
    )


@contextlib.contextmanager
def _status(text: str) -> Iterator[None]:
    if err.is_terminal:
        with err.status(text):
            yield
    else:
        yield


def _forward_hint(fn: Callable[[], Any], input_size: Sequence[int]) -> Any:
    """Run ``fn`` (which runs the model); explain a forward pass that fails on the input size."""
    try:
        return fn()
    except RuntimeError as exc:
        size = ",".join(map(str, input_size))
        raise RuntimeError(
            f"the model's forward pass failed on a 1x{size.replace(',', 'x')} input "
            f"({' '.join(str(exc).split())[:200]}); check --input-size {size}"
        ) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def _say(text: str) -> None:
    """A line of plain text on stdout: no markup, never wrapped."""
    out.print(text, soft_wrap=True, markup=False)


def _num(n: int) -> str:
    return f"{n:,}"


def _ratio(before: int, after: int) -> str:
    if after <= 0:
        return "n/a"
    return f"{before / after:.2f}x fewer, {100 * (after - before) / max(before, 1):+.1f}%"


# --------------------------------------------------------------------------- rendering


def plan_table(p: Plan, title: str | None = None) -> Table:
    """The Plan as a table: layer, method, ranks, MACs and params before/after, skip reason."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("layer", no_wrap=True)
    table.add_column("method", no_wrap=True)
    table.add_column("ranks", no_wrap=True)
    for name in ("MACs before", "MACs after", "params before", "params after"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("skipped because", overflow="fold", ratio=1)
    for lp in p.layers:
        style = None if lp.method else "dim"
        table.add_row(
            Text(lp.name),
            lp.method or "-",
            ", ".join(map(str, lp.ranks)) or "-",
            _num(lp.macs_before),
            _num(lp.macs_after),
            _num(lp.params_before),
            _num(lp.params_after),
            Text(lp.reason),
            style=style,
        )
    return table


def _totals_line(
    macs: tuple[int, int], params: tuple[int, int], decomposed: int, total: int
) -> str:
    return (
        f"{decomposed} of {total} layers decomposed; "
        f"MACs {_num(macs[0])} -> {_num(macs[1])} ({_ratio(*macs)}); "
        f"params {_num(params[0])} -> {_num(params[1])} ({_ratio(*params)})"
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


# ---------------------------------------------------------------------------- decompose


@dataclass
class _Job:
    """What one decompose run reads, writes and prints."""

    source: Path
    target: Path | None
    dry_run: bool
    json_output: bool
    size: list[int] = field(default_factory=list)
    macs_before: int | None = None  # known when the plan was made here, else measured
    data: str | None = None  # calibrate batch norm (and weight a MACs budget) on this data
    batches: int = 30
    _loader: Any = None

    def loader(self) -> Any:
        """The training loader of ``data``, loaded once."""
        if self._loader is None:
            from decomp.data import load_data

            self._loader = load_data(self.data, tuple(self.size)).train_loader
        return self._loader


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


def _make_plan(
    model: nn.Module,
    method: str,
    rank: str,
    input_size: list[int],
    exclude: list[str],
    force: bool,
    target_macs: str | None = None,
    data: Any = None,
) -> Plan:
    with _status("planning" if data is None else "measuring layer importance and planning"):
        return _forward_hint(
            lambda: plan(model, method, rank, input_size, exclude, force, target_macs, data),
            input_size,
        )


def _apply_with_progress(model: nn.Module, p: Plan) -> nn.Module:
    names = [lp.name for lp in p.decomposed]
    with _progress() as bar:
        task = bar.add_task(f"{p.method}: {names[0]}", total=len(names))

        def step(name: str) -> None:
            done = int(bar.tasks[0].completed) + 1
            label = names[done] if done < len(names) else "done"
            bar.update(task, advance=1, description=f"{p.method}: {label}")

        return apply(model, p, progress=step)


def decompose_command(
    model: ModelArg,
    method: Annotated[
        Method | None,
        typer.Option(
            "--method",
            "-m",
            help="tucker (kxk convs), cp (kxk convs), svd (linear and 1x1 convs), or auto "
            "(tucker for kxk, svd for the rest). Default: tucker.",
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
    weigh_layers: Annotated[
        bool,
        typer.Option(
            "--weigh-layers",
            help="With --target-macs and --data: weight each layer's estimated error by the "
            "output damage measured on 4 training batches (slower; see the README for how it "
            "compares).",
        ),
    ] = False,
    data: DataOpt = None,
    calibrate_batches: Annotated[
        int,
        typer.Option(
            "--calibrate-batches",
            min=0,
            help="With --data: re-estimate batch-norm statistics on this many training batches "
            "after decomposing (no training).",
        ),
    ] = 30,
    verbose: VerboseOpt = False,
) -> None:
    """Decompose a model's layers and save the compressed model as a decomp file."""
    with _command(verbose):
        size = parse_input_size(input_size)
        fixed = None
        if plan_file is not None:
            _check_plan_conflicts(
                method=method, rank=rank, exclude=exclude, force=force, target_macs=target_macs
            )
            fixed = _read_plan_file(plan_file)
        else:
            parse_rank_spec(rank or DEFAULT_RANK)
        if weigh_layers and not (target_macs and data):
            raise ValueError("--weigh-layers needs --target-macs and --data")
        checkpoint.check_input_path(model)
        name = fixed.method if fixed else (method or Method.tucker).value
        job = _Job(model, None, dry_run, json_output, data=data, batches=calibrate_batches)
        if not dry_run:
            job.target = output or model.with_name(f"{model.stem}_{name}.pt")
            checkpoint.check_output_path(job.target, source=model)
        net = _load(model, arch, arch_kwargs, trust_pickle)
        if fixed is not None:
            job.size = list(size or fixed.input_size)
            _check_plan_fits(net, fixed)
            p = recount(net, replace(fixed, input_size=job.size))
        else:
            job.size = _input_size(size, net, model)
            spec = rank or DEFAULT_RANK
            weigh = job.loader() if weigh_layers else None
            p = _make_plan(net, name, spec, job.size, exclude or [], force, target_macs, weigh)
            job.macs_before = p.model_macs
        _run_job(net, p, job)


def _check_plan_fits(net: nn.Module, p: Plan) -> None:
    """Fail before any output when a --plan names layers or shapes this model does not have."""
    if p.decomposed:
        apply(net, p, init="structure")


def _run_job(net: nn.Module, p: Plan, job: _Job) -> None:
    if job.dry_run and job.json_output:
        sys.stdout.write(p.to_json() + "\n")
        return
    if not job.json_output:
        title = f"{p.method} plan, rank {p.rank}, input {_size(job.size)}"
        out.print(plan_table(p, title=title))
    if not p.decomposed:
        _nothing(p, job)
    elif job.dry_run:
        macs, params = (p.model_macs, p.macs_after), (p.model_params, p.params_after)
        totals = _totals_line(macs, params, len(p.decomposed), len(p.layers))
        _say(f"{totals}\ndry run: nothing written")
    else:
        _decompose_and_save(net, p, job)


def _decompose_and_save(net: nn.Module, p: Plan, job: _Job) -> None:
    start = time.perf_counter()
    compressed = _apply_with_progress(net, p)
    size = job.size
    before = job.macs_before if job.macs_before is not None else count_macs(net, size)
    after = _forward_hint(lambda: count_macs(compressed, size), size)
    params = (count_params(net), count_params(compressed))
    calibrated = _calibrate(compressed, job)
    extra = {
        "decompose": {"method": p.method, "rank": p.rank, "input_size": size},
        "bn_calibrated": calibrated,
    }
    checkpoint.save(compressed, job.target, input_size=size, source=job.source, extra=extra)
    seconds = time.perf_counter() - start
    if job.json_output:
        _print_json(_result(p, job, (before, after), params, seconds))
        return
    totals = _totals_line((before, after), params, len(p.decomposed), len(p.layers))
    _say(totals)
    _say(f"wrote {job.target} ({_size_mb(job.target)}) in {seconds:.1f} s")


def _calibrate(model: nn.Module, job: _Job) -> bool:
    """Re-estimate batch-norm statistics on the job's data (no training); whether it was done."""
    if job.data is None or job.batches == 0:
        return False
    from decomp.batchnorm import calibrate

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        _say("no batch-norm layers: nothing to calibrate")
        return False
    with _status(f"calibrating batch norm on {job.batches} batches of {job.data}"):
        calibrate(model, job.loader(), batches=job.batches)
    return True


def _nothing(p: Plan, job: _Job) -> None:
    message = (
        f"nothing to decompose: all {len(p.layers)} layers are skipped under {p.method} at rank "
        f"{p.rank} (reasons in the table); no file written"
    )
    if job.json_output:
        _print_json(
            {
                "status": "nothing_to_decompose",
                "input": str(job.source),
                "output": None,
                "message": message,
                "plan": p.to_dict(),
            }
        )
    else:
        _say(message)


def _result(
    p: Plan,
    job: _Job,
    macs: tuple[int, int],
    params: tuple[int, int],
    seconds: float,
) -> dict[str, Any]:
    return {
        "status": "written",
        "input": str(job.source),
        "output": str(job.target),
        "method": p.method,
        "rank": p.rank,
        "input_size": job.size,
        "layers": len(p.layers),
        "decomposed": len(p.decomposed),
        "macs_before": macs[0],
        "macs_after": macs[1],
        "params_before": params[0],
        "params_after": params[1],
        "macs_reduction": macs[0] / max(macs[1], 1),
        "seconds": round(seconds, 3),
        "plan": p.to_dict(),
    }


def _size(size: Sequence[int]) -> str:
    return "x".join(map(str, size))


def _size_mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


# ------------------------------------------------------------------------------ inspect

INSPECT_METHODS = ("tucker", "cp", "svd", "auto")


_SHORT_REASONS = {
    "would not cut MACs": "no MAC saving",
    "gives rank 0": "rank 0",
    "already factorized": "factorized",
    "excluded by": "excluded",
    "not called": "not called",
}


def _short_reason(reason: str) -> str:
    """A few words for a table cell: '1x1 conv', 'linear layer', 'no MAC saving', ..."""
    for key, short in _SHORT_REASONS.items():
        if key in reason:
            return short
    return reason.split(";")[0].split(":")[0]


def _cell(lp: Any) -> Text:
    if not lp.method:
        return Text(_short_reason(lp.reason), style="dim")
    change = 100 * (lp.macs_after - lp.macs_before) / max(lp.macs_before, 1)
    return Text(f"{'/'.join(map(str, lp.ranks))} {change:+.0f}%")


def _inspect_table(plans: dict[str, Plan]) -> Table:
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
            "x".join(map(str, first.shape)),
            _num(first.macs_before),
            _num(first.params_before),
            *(_cell(lp) for lp in layers),
        )
    return table


def _methods_table(plans: dict[str, Plan]) -> Table:
    table = Table(header_style="bold", title="totals per method", title_justify="left")
    for name in ("method", "layers", "MACs after", "MACs change", "params after"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method, p in plans.items():
        change = 100 * (p.macs_after - p.model_macs) / max(p.model_macs, 1)
        table.add_row(
            method,
            f"{len(p.decomposed)}/{len(p.layers)}",
            _num(p.macs_after),
            f"{change:+.1f}%",
            _num(p.params_after),
        )
    return table


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
    with _command(verbose):
        size = parse_input_size(input_size)
        spec = str(parse_rank_spec(rank or DEFAULT_RANK))
        checkpoint.check_input_path(model)
        net = _load(model, arch, arch_kwargs, trust_pickle)
        size = _input_size(size, net, model)
        plans = {m: _make_plan(net, m, spec, size, [], False) for m in INSPECT_METHODS}
        competition = _forward_hint(lambda: count_macs_competition(net, size), size)
        summary = _summary(model, net, size, spec, plans[INSPECT_METHODS[0]], competition)
        if json_output:
            _print_json({**summary, "plans": {m: p.to_dict() for m, p in plans.items()}})
            return
        ref = summary["arch"]
        arch_text = describe_arch(ref) if ref else "none (a pickle)"
        _say(
            f"{model}: {summary['kind']} file, arch {arch_text}, input {_size(size)}, "
            f"{summary['plans_applied']} plan(s) applied"
        )
        _say(
            f"MACs {_num(summary['macs'])} (thop), {_num(competition)} (competition, ptflops); "
            f"params {_num(summary['params'])}; rank {spec}"
        )
        out.print(_inspect_table(plans))
        out.print(_methods_table(plans))


def _summary(
    path: Path, net: nn.Module, size: list[int], spec: str, p: Plan, competition: int
) -> dict[str, Any]:
    meta = getattr(net, checkpoint.META_ATTR, None) or {}
    return {
        "model": str(path),
        "kind": meta.get("kind"),
        "arch": getattr(net, checkpoint.ARCH_ATTR, None),
        "input_size": size,
        "rank": spec,
        "macs": p.model_macs,
        "macs_competition": competition,
        "params": p.model_params,
        "plans_applied": len(applied_plans(net)),
    }


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
    verbose: VerboseOpt = False,
) -> None:
    """Export a model to ONNX or TorchScript, checked against PyTorch (relative error < 1e-4)."""
    with _command(verbose):
        size = parse_input_size(input_size)
        checkpoint.check_input_path(model)
        suffix = ".onnx" if format is ExportFormat.onnx else ".torchscript.pt"
        target = output or model.with_name(model.stem + suffix)
        checkpoint.check_output_path(target, source=model)
        net = _load(model, arch, arch_kwargs, trust_pickle)
        size = _input_size(size, net, model)
        with _status(f"exporting to {format.value}"):
            error = _forward_hint(lambda: export(net, target, format.value, size), size)
        runner = "onnxruntime" if format is ExportFormat.onnx else "torch.jit.load"
        check = (
            f"{runner} matches PyTorch (relative error {error:.1e})"
            if error is not None
            else "not verified (onnxruntime is not installed)"
        )
        _say(f"wrote {target} ({_size_mb(target)}); {check}")


# ----------------------------------------------------- train, finetune, evaluate, demo


_DEMO_METHOD = Method(pipeline_defaults.DEMO_METHOD)
EpochsOpt = Annotated[int, typer.Option("--epochs", min=0, help="Training epochs.")]


def train_command(
    arch: Annotated[
        str, typer.Option("--arch", metavar="MODULE:FACTORY", help="The model to train.")
    ] = "torchvision.models:resnet18",
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = "fashion-mnist",
    epochs: EpochsOpt = pipeline_defaults.DEMO_EPOCHS,
    input_size: InputSizeOpt = "3,32,32",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="PATH", help="Default: runs/baseline.pt."),
    ] = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train a baseline from scratch and save it as a decomp file (input size, class names)."""
    from decomp.pipeline import train_baseline

    with _command(verbose):
        size = parse_input_size(input_size)
        if output is None:
            output = Path("runs/baseline.pt")
            output.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.check_output_path(output)
        outcome = train_baseline(
            arch, arch_kwargs, data, size, epochs, output, progress=not json_output
        )
        _report(outcome.to_dict(), outcome.test, json_output, f"trained {arch}", output)


def finetune_command(
    model: ModelArg,
    data: DataOpt = "fashion-mnist",
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", metavar="ORIGINAL", help="Distil from this model (KD)."),
    ] = None,
    epochs: EpochsOpt = pipeline_defaults.DEMO_FINETUNE_EPOCHS,
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
    ] = 30,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune a (decomposed) model from its own weights; distil from --teacher if given."""
    from decomp.batchnorm import calibrate
    from decomp.data import load_data
    from decomp.distributed import setup_distributed
    from decomp.pipeline import finetune

    with _command(verbose):
        checkpoint.check_input_path(model)
        target = output or model.with_name(f"{model.stem}_ft.pt")
        checkpoint.check_output_path(target, source=model)
        net = _load(model, arch, arch_kwargs, trust_pickle)
        size = _input_size(None, net, model)
        teacher_net = None if teacher is None else _load(teacher, None, None, trust_pickle)
        setup_distributed()  # under torchrun: before the loaders, so they shard the data
        bundle = load_data(data, tuple(size))
        meta = getattr(net, checkpoint.META_ATTR, None) or {}
        extra = None
        if calibrate_batches and not (meta.get("extra") or {}).get("bn_calibrated"):
            calibrate(net, bundle.train_loader, batches=calibrate_batches)
            extra = {"bn_calibrated": True, "calibration_batches": calibrate_batches}
        outcome = finetune(
            net,
            bundle,
            teacher=teacher_net,
            epochs=epochs,
            output=target,
            resume=resume,
            progress=not json_output,
            extra=extra,
        )
        _report(outcome.to_dict(), outcome.test, json_output, f"fine-tuned {model}", target)


def _report(record: dict, test: dict | None, json_output: bool, title: str, path: Path) -> None:
    from decomp.pipeline import evaluation_table

    if json_output:
        _print_json(record)
        return
    if test is not None:
        out.print(evaluation_table(test, title=f"{title}: test split"))
    _say(f"wrote {path}")


def evaluate_command(
    model: ModelArg,
    data: DataOpt = "fashion-mnist",
    input_size: InputSizeOpt = None,
    latency: Annotated[
        bool, typer.Option("--latency/--no-latency", help="Time batch 1 and 64 forwards.")
    ] = True,
    baseline_macs: Annotated[
        int, typer.Option("--baseline-macs", help="Competition score: the baseline's MACs.")
    ] = 13_863_553,
    baseline_f1: Annotated[
        float, typer.Option("--baseline-f1", help="Competition score: the baseline's F1.")
    ] = 0.8342,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Macro F1, accuracy, per-class F1, MACs (thop and ptflops), params, latency, score."""
    from decomp.data import load_data
    from decomp.pipeline import evaluate, evaluation_table

    with _command(verbose):
        checkpoint.check_input_path(model)
        net = _load(model, arch, arch_kwargs, trust_pickle)
        size = _input_size(parse_input_size(input_size), net, model)
        bundle = load_data(data, tuple(size))
        metrics = evaluate(
            net,
            bundle,
            size,
            latency=latency,
            baseline_macs=baseline_macs,
            baseline_f1=baseline_f1,
        )
        if json_output:
            _print_json(metrics)
        else:
            out.print(evaluation_table(metrics, title=f"{model} on {data}"))


def demo_command(
    output_dir: Annotated[Path, typer.Option("--output-dir", metavar="DIR")] = Path("runs/demo"),
    epochs: EpochsOpt = pipeline_defaults.DEMO_EPOCHS,
    finetune_epochs: Annotated[
        int, typer.Option("--finetune-epochs", min=0)
    ] = pipeline_defaults.DEMO_FINETUNE_EPOCHS,
    method: Annotated[Method, typer.Option("--method", "-m")] = _DEMO_METHOD,
    rank: Annotated[str, typer.Option("--rank", metavar="SPEC")] = pipeline_defaults.DEMO_RANK,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train the baseline again even if one is cached.")
    ] = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fashion-MNIST end to end: train (or reuse) ResNet-18, decompose, calibrate, fine-tune."""
    from decomp.pipeline import demo_table, run_demo

    with _command(True if not json_output else verbose):
        parse_rank_spec(rank)
        results = run_demo(
            output_dir,
            epochs,
            finetune_epochs,
            rank,
            method.value,
            retrain=retrain,
            progress=not json_output,
        )
        if json_output:
            _print_json(results)
        else:
            out.print(demo_table(results))
            _say(f"results in {Path(output_dir) / 'results.json'}")


# ---------------------------------------------------------------------------- the apps


def _version(value: bool) -> None:
    if value:
        from decomp import __version__

        out.print(f"decomp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Compress PyTorch CNNs by tensor decomposition (Tucker-2, CP, SVD; VBMF ranks)."""


app.command("decompose", no_args_is_help=True)(decompose_command)
app.command("inspect", no_args_is_help=True)(inspect_command)
app.command("export", no_args_is_help=True)(export_command)
app.command("train")(train_command)
app.command("finetune", no_args_is_help=True)(finetune_command)
app.command("evaluate", no_args_is_help=True)(evaluate_command)
app.command("demo")(demo_command)

decompose_app = typer.Typer(name="decompose", **_APP_SETTINGS)
decompose_app.command(no_args_is_help=True)(decompose_command)


def main() -> None:
    """Entry point of ``decomp``."""
    app(prog_name="decomp")


def decompose_main() -> None:
    """Entry point of the standalone ``decompose``."""
    decompose_app(prog_name="decompose")
