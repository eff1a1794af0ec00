"""Export to ONNX or TorchScript, checked against PyTorch before the file is put in place."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from decomp._utils import (
    PathLike,
    atomic_write,
    check_input_size,
    select_output,
    training_flags,
)

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")


def export(
    model: nn.Module,
    path: PathLike,
    format: str,
    input_size: Sequence[int],
    *,
    verify: bool = True,
    tolerance: float = 1e-4,
    output: str | int | None = None,
) -> float | None:
    """Export ``model`` to ONNX (torch.export-based exporter) or TorchScript (trace), atomically.

    The batch dimension stays dynamic. With ``verify``, the exported file is run (onnxruntime or
    ``torch.jit.load``) on a random batch of 3 and compared with the PyTorch model before it is
    renamed into place, so a file that does not match is never left behind.

    Args:
        model: the model (exported in eval mode; its own mode is restored).
        path: the output file.
        format: "onnx" or "torchscript".
        input_size: (C, H, W) of one input.
        verify: run the exported file and measure the difference.
        tolerance: the largest relative error accepted.
        output: for a model that returns a tuple, list or dict, the entry to export (an index
            or a key; default the first): the file has that one output (see
            :func:`decomp._utils.select_output`).

    Returns:
        The relative error ``||y_export - y|| / ||y||``, or None when not verified (or
        onnxruntime is not installed).

    Raises:
        RuntimeError: the exported outputs differ by more than ``tolerance``.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(
            f"unknown export format {format!r}; expected one of {list(EXPORT_FORMATS)}"
        )
    size = check_input_size(input_size)
    writer = _write_onnx if format == "onnx" else _write_torchscript
    runner = _run_onnx if format == "onnx" else _run_torchscript
    error: list[float | None] = [None]
    model = SingleOutput(model, output)

    def write(tmp: Path) -> None:
        example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        writer(model, example, tmp)
        if verify:
            error[0] = _verify(model, tmp, runner, size, tolerance)

    with training_flags(model, train=False):
        with torch.no_grad():  # a clear error on an unusable output, before any export work
            model(torch.zeros(1, *size))
        atomic_write(path, write)
    return error[0]


class SingleOutput(nn.Module):
    """``model`` with its output reduced to one tensor (:func:`decomp._utils.select_output`)."""

    def __init__(self, model: nn.Module, key: str | int | None = None) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(x), self.key)


def _verify(
    model: nn.Module,
    tmp: Path,
    runner: Callable[[PathLike, torch.Tensor], torch.Tensor | None],
    size: Sequence[int],
    tolerance: float,
) -> float | None:
    """Relative error of the exported file against ``model`` on a batch of 3; raise if too big."""
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    got = runner(tmp, x)
    if got is None:
        return None
    error = float((got - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny))
    if not error <= tolerance:
        raise RuntimeError(
            f"the exported model's outputs differ from PyTorch's (relative error {error:.2e} > "
            f"{tolerance:.0e}); nothing was written"
        )
    return error


def _write_onnx(model: nn.Module, example: torch.Tensor, tmp: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    sink = _LogSink()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        program.save(str(tmp), external_data=False)


def _write_torchscript(model: nn.Module, example: torch.Tensor, tmp: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(tmp))


def _run_onnx(path: PathLike, x: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime
    except ImportError:
        logger.warning("onnxruntime is not installed; the ONNX file was not verified")
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _run_torchscript(path: PathLike, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x)


class _LogSink:
    """A stdout stand-in that passes the exporter's chatter to the debug log."""

    def write(self, text: str) -> int:
        if text.strip():
            logger.debug("%s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass
