"""Running a module under a runtime and timing it fairly: what every latency decomp reports
comes from here.

- :class:`Key`: what a measurement is valid for: runtime (``torch`` eager or ``onnxruntime``),
  device, batch, threads, and the versions and processor that ran it.
- :func:`runner`: one call of a module on a fixed input, in eager PyTorch or through an ONNX
  Runtime session on its export.
- :func:`interleaved`: several runs timed in rounds, one block of calls each per round, the
  order reversed every other round (``torch.utils.benchmark.Timer`` on the CPU, CUDA events on
  a GPU), so that a change of the machine's load falls on all of them alike.
- :func:`measure_model` and :func:`paired_latency`: whole models (batch norm folded by
  :func:`decomp.fuse`), alone or two of them back to back with the speed-up's spread.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from decomp._utils import check_input_size, cpu_model
from decomp.fuse import fuse

RUNTIMES = ("torch", "onnxruntime")
DEVICES = ("cpu", "cuda")
LAYER_TIMING = {"rounds": 5, "block_s": 0.01, "max_s": 10.0}
MODEL_TIMING = {"rounds": 15, "block_s": 0.05, "max_s": 30.0}
"""Interleaved rounds, the least time one block of calls of one candidate takes, and about how
long all rounds may take (fewer rounds, at least 3, for slow candidates)."""


@dataclass(frozen=True)
class Key:
    """What a latency measurement is valid for; a table is refused for any other key."""

    runtime: str
    device: str
    batch: int
    threads: int
    versions: dict[str, str | None] = field(default_factory=dict, hash=False)
    device_name: str = ""

    @classmethod
    def current(
        cls, runtime: str = "torch", device: str = "cpu", batch: int = 1, threads: int | None = None
    ) -> Key:
        """The key of a measurement made here now (versions and processor filled in)."""
        check_setting(runtime, device, batch, threads)
        versions = {"torch": str(torch.__version__)}
        if runtime == "onnxruntime":
            versions["onnxruntime"] = _onnxruntime().__version__
        name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()
        return cls(runtime, device, batch, threads or torch.get_num_threads(), versions, name)

    def describe(self) -> str:
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        return f"{self.runtime} on {self.device}, batch {self.batch}, {threads}"

    def differences(self, other: Key) -> list[str]:
        """``"field: mine != other's"`` for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k} {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def check_setting(runtime: str, device: str, batch: int, threads: int | None) -> None:
    """A ValueError naming the allowed values when the runtime, device, batch or threads are off."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {sorted(RUNTIMES)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {sorted(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device; use cpu")
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch!r}")
    if threads is not None and (
        isinstance(threads, bool) or int(threads) != threads or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer; got {threads!r}")


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(
            "runtime 'onnxruntime' needs the onnxruntime package: pip install 'decomp[export]'"
        ) from None
    return onnxruntime


def _onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    """``module`` exported to ONNX at the fixed shape of ``x`` (the TorchScript-based exporter
    is fast on small graphs; the torch.export one where it is gone)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (x,), buffer, dynamo=False)
            return buffer.getvalue()
        except (TypeError, RuntimeError, ValueError):
            program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
            return program.model_proto.SerializeToString()


def runner(module: nn.Module, x: torch.Tensor, key: Key) -> Callable[[], Any]:
    """A call that runs ``module`` on ``x`` once under the key's runtime and device."""
    module = module.eval()
    if key.runtime == "torch":
        device = torch.device(key.device)
        module, x = module.to(device), x.to(device)
        return lambda: module(x)
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = key.threads, 1
    provider = "CUDAExecutionProvider" if key.device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise ValueError(f"onnxruntime has no {provider} here; use --runtime torch")
    session = ort.InferenceSession(_onnx_bytes(module.cpu(), x.cpu()), options, [provider])
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: session.run(None, feed)


@contextlib.contextmanager
def _timing(key: Key) -> Iterator[None]:
    """Inference mode, the key's torch threads, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(key.threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _timer_class() -> Any:
    """``torch.utils.benchmark.Timer``, imported without the warning torch logs on a machine
    with a CUDA folder but no CUDA runtime ("No CUDA runtime is found"), which says nothing
    about CPU timing."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer


def _block_ms(run: Callable[[], Any], number: int, key: Key) -> float:
    """Milliseconds per call over ``number`` calls: CUDA events on a GPU, else
    ``torch.utils.benchmark.Timer``."""
    if key.device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(number):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / number
    timer = _timer_class()("run()", globals={"run": run}, num_threads=key.threads)
    return timer.timeit(number).median * 1e3


def interleaved(
    runs: Sequence[Callable[[], Any]],
    key: Key,
    rounds: int,
    block_s: float,
    max_s: float | None = None,
) -> list[list[float]]:
    """Per-call milliseconds of every run in each round: one block of calls per run per round,
    the order reversed every other round, so that a change in the machine's load falls on all
    of them alike. Each run is warmed up and its block sized to last about ``block_s``; with
    ``max_s``, fewer rounds (at least 3) where all of them would take longer than that."""
    numbers, round_ms = [], 0.0
    with _timing(key):
        for run in runs:
            run()  # the first call pays one-off costs (allocations, kernel selection)
            once = _block_ms(run, 1, key)
            numbers.append(max(1, min(10_000, math.ceil(block_s * 1e3 / max(once, 1e-6)))))
            round_ms += numbers[-1] * once
        if max_s is not None:
            rounds = max(min(rounds, 3), min(rounds, int(max_s * 1e3 / max(round_ms, 1e-6))))
        times: list[list[float]] = [[] for _ in runs]
        for r in range(rounds):
            order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
            for i in order:
                times[i].append(_block_ms(runs[i], numbers[i], key))
    return times


def measure_model(model: nn.Module, input_size: Sequence[int], key: Key) -> float:
    """Median whole-model latency (fused) in milliseconds, over interleaved-style rounds."""
    size = check_input_size(input_size, dims=None)
    x = torch.randn(key.batch, *size)
    (times,) = interleaved([runner(fuse(model), x, key)], key, **MODEL_TIMING)
    return float(statistics.median(times))


def paired_latency(
    original: nn.Module,
    compressed: nn.Module,
    input_size: Sequence[int],
    *,
    runtime: str = "torch",
    device: str = "cpu",
    batch: int = 1,
    threads: int | None = None,
    rounds: int = MODEL_TIMING["rounds"],
    block_s: float = MODEL_TIMING["block_s"],
    max_s: float | None = MODEL_TIMING["max_s"],
    fused: bool = True,
) -> dict[str, Any]:
    """Time two models back to back, interleaved, and report the speed-up with its spread.

    Both are fused first (:func:`decomp.fuse`, unless ``fused=False``) and run under the same
    runtime, device, batch and threads. Each round times one block of calls of each (the order
    reversed every other round); the speed-up is the median over rounds of
    ``original_ms / compressed_ms``, so a change of load during the run cancels out. Slow
    models get fewer rounds (at least 3) so that all of them take about ``max_s``.

    Returns:
        ``{"original_ms", "compressed_ms" (medians), "speedup" (median of the per-round
        ratios), "ratio" (compressed / original, its inverse), "speedup_iqr" ([25th, 75th]
        percentiles), "speedup_range" ([min, max]), "rounds", "runtime", "device", "batch",
        "threads", "load_average"}``.
    """
    key = Key.current(runtime, device, batch, threads)
    size = check_input_size(input_size, dims=None)
    x = torch.randn(batch, *size)
    prepare = fuse if fused else (lambda m: copy.deepcopy(m).eval())
    runs = [runner(prepare(m), x, key) for m in (original, compressed)]
    before, after = interleaved(runs, key, rounds, block_s, max_s)
    speedups = [b / a for b, a in zip(before, after, strict=True)]
    return {
        "original_ms": statistics.median(before),
        "compressed_ms": statistics.median(after),
        "speedup": statistics.median(speedups),
        "ratio": statistics.median(a / b for b, a in zip(before, after, strict=True)),
        "speedup_iqr": [float(np.percentile(speedups, 25)), float(np.percentile(speedups, 75))],
        "speedup_range": [min(speedups), max(speedups)],
        "rounds": len(speedups),
        "runtime": runtime,
        "device": device,
        "batch": batch,
        "threads": key.threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
