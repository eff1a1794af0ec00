"""What every command shares: the consoles, error handling and logging, option types, loading.

:func:`command` wraps a command's body: it sends the library's logs to stderr and turns any
failure into one line on stderr and exit code 1 (never a traceback, unless DECOMP_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from decomp import checkpoint
from decomp.data import NORMALIZATIONS, Preprocessing, parse_preprocessing, recorded_preprocessing
from decomp.factorize import registry
from decomp.plan import FITS
from decomp.recipes import DEFAULT_RANK
from decomp.tltorch import from_tltorch

DEBUG_ENV = "DECOMP_DEBUG"
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


def parse_method(value: str) -> str:
    """A ``--method`` value: a method of the registry (read when the command runs, so a method
    registered by a plug-in counts) or ``auto``; a usage error listing the choices otherwise."""
    try:
        return registry.check_choice(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def method_option(help: str, show_default: bool = True) -> Any:
    """The ``--method/-m`` option, checked against the method registry by :func:`parse_method`."""
    return typer.Option(
        "--method",
        "-m",
        parser=parse_method,
        metavar="METHOD",
        help=help,
        show_default=show_default,
    )


# ---------------------------------------------------------------------------- option types

Fit = StrEnum("Fit", {name: name for name in FITS})

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
ModelOutputOpt = Annotated[
    str | None,
    typer.Option(
        "--model-output",
        metavar="KEY",
        help="For a model whose forward returns a tuple, list or dict: the entry to use (an "
        "index or a key). Default: the first.",
    ),
]

# ---------------------------------------------------- how data is read (preprocessing, split)

Normalize = StrEnum("Normalize", {name: name for name in NORMALIZATIONS})

_RECORDED = "Default: what the model's file records, else"
NormalizeOpt = Annotated[
    Normalize | None,
    typer.Option(
        "--normalize",
        help="Pixel normalization: imagenet (ImageNet's mean and std), unit (pixels in [0, 1]) "
        f"or minus-one-one ([-1, 1]). {_RECORDED} the data's own (ImageNet's for a folder).",
        show_default=False,
    ),
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean",
        metavar="M[,M,M]",
        help="Per-channel mean of pixels in [0, 1], instead of --normalize, e.g. 0.5,0.5,0.5.",
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option("--std", metavar="S[,S,S]", help="Per-channel std, with --mean."),
]
ResizeOpt = Annotated[
    str | None,
    typer.Option(
        "--resize",
        metavar="squash|crop[:F]",
        help="How a folder's images meet the input size: squash (resize to H x W) or crop "
        "(keep the aspect ratio, resize to cover H x W / F, take the centre; F = 0.875, "
        f"ImageNet's 224 of 256). {_RECORDED} squash.",
    ),
]
ValSplitOpt = Annotated[
    float | None,
    typer.Option(
        "--val-split",
        metavar="F|N",
        help="Hold out this fraction (0.2) or count (500) of the training images for "
        "validation (stratified, seeded): for a folder without val/, and Fashion-MNIST's 5000.",
    ),
]


def val_split_count(value: float | None) -> float | int | None:
    """--val-split as the data module takes it: a count when it is a whole number >= 1."""
    return int(value) if value is not None and value >= 1 and value.is_integer() else value


def preprocessing_options(
    model: nn.Module | None,
    normalize: Normalize | None,
    mean: str | None,
    std: str | None,
    resize: str | None,
) -> Preprocessing | None:
    """The preprocessing options over what ``model``'s file records (None: neither)."""
    base = None if model is None else recorded_preprocessing(model)
    name = None if normalize is None else normalize.value
    return parse_preprocessing(name, mean, std, resize, base=base)


# ------------------------------------------------------------------------------ output

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log progress details (INFO) on stderr.")
]


# ------------------------------------------------------------------------------ plumbing


@contextlib.contextmanager
def command(verbose: bool) -> Iterator[None]:
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


@contextlib.contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner on a terminal's stderr while the block runs; nothing elsewhere."""
    if err.is_terminal:
        with err.status(text):
            yield
    else:
        yield


def progress_bar() -> Progress:
    """A transient progress bar on stderr (shown on a terminal only)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def print_json(data: Any) -> None:
    """One JSON object on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def say(text: str) -> None:
    """A line of plain text on stdout: no markup, never wrapped."""
    out.print(text, soft_wrap=True, markup=False)


# ------------------------------------------------------------------------------ models


def add_cwd_to_path() -> None:
    """Let --arch name a module in the current folder, the way ``python -m`` would."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def load_model(path: Path, arch: str | None, arch_kwargs: str | None, trust: bool) -> nn.Module:
    """:func:`decomp.load` of a command's MODEL, ``--arch`` resolved from the current folder too;
    tensorly-torch layers become the plain-layer modules they equal (:func:`decomp.from_tltorch`),
    so that MACs are counted and exports work."""
    add_cwd_to_path()
    with status(f"loading {path}"):
        model = checkpoint.load(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust)
        return from_tltorch(model, inplace=True)


def input_size_of(given: Sequence[int] | None, model: nn.Module, path: Path) -> list[int]:
    """The parsed --input-size, else the one the file records (metadata or last plan), else an
    error that says to pass it."""
    if given is not None:
        return list(given)
    recorded = checkpoint.recorded_input_size(model)
    if recorded:
        logging.getLogger("decomp").info("input size %s, from %s", recorded, path)
        return recorded
    raise ValueError(
        f"--input-size C,H,W is needed: {path} does not record the model's input size "
        "(e.g. --input-size 3,224,224)"
    )


def forward_hint(fn: Callable[[], Any], input_size: Sequence[int]) -> Any:
    """Run ``fn`` (which runs the model); explain a forward pass that fails on the input size."""
    try:
        return fn()
    except RuntimeError as exc:
        size = ",".join(map(str, input_size))
        raise RuntimeError(
            f"the model's forward pass failed on a 1x{size.replace(',', 'x')} input "
            f"({' '.join(str(exc).split())[:200]}); check --input-size {size}"
        ) from None
