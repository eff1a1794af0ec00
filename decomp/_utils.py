"""What several modules need, written once.

- :func:`atomic_write` / :func:`atomic_write_text`: a file is replaced whole or not at all.
- :func:`model_device`, :func:`model_dtype`: where a model lives and in what precision.
- :func:`training_flags`: save every module's training flag, restore it afterwards.
- :func:`parse_input_size`, :func:`check_input_size`: ``(C, H, W)`` from text or a sequence, with
  one error message for every caller.
- :func:`environment` (:func:`versions` and :func:`machine`): what results files record about the
  run.
- :func:`plain`: any result as JSON data.
- :func:`batch_images`: the images of a loader batch.
- :func:`check_choice`: a value from a fixed set, or an error that lists the set.
- :func:`select_output`: the tensor to measure in a model's output (tuple, dict or tensor).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import operator
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PathLike = str | os.PathLike[str]

# ------------------------------------------------------------------------------ atomic files


def atomic_write(path: PathLike, write: Callable[[Path], None], *, parents: bool = False) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    Readers see the old file or the new one, never a partial one; on any failure (or an
    interrupt) the temporary file is removed and ``path`` is left as it was. The file gets the
    permissions a plain ``open`` would give it (0o666 less the umask), not mkstemp's 0o600.

    Args:
        path: the file to write.
        write: writes the whole content to the path it is given.
        parents: create missing parent folders first (else a missing folder is an error).

    Returns:
        ``path``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if parents:
        folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_write_text(path: PathLike, text: str, *, parents: bool = False) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), parents=parents)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------ models


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; the CPU for a model without any."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter or buffer; float32 without any."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@contextlib.contextmanager
def training_flags(*models: nn.Module, train: bool | None = None) -> Iterator[None]:
    """Save the training flag of every module of ``models``; restore each one on exit.

    Args:
        models: the models whose flags come back exactly as they were (mixed flags included).
        train: put the models in this mode on entry (``False``: eval mode); None leaves them.
    """
    saved = [(module, module.training) for model in models for module in model.modules()]
    try:
        if train is not None:
            for model in models:
                model.train(train)
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def batch_images(batch: Any) -> Tensor:
    """The images of a loader batch that is ``images`` or ``(images, labels, ...)``."""
    return batch[0] if isinstance(batch, list | tuple) else batch


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    """Raise ``ValueError("unknown NAME 'x'; expected one of [...]")`` unless ``value`` is in
    ``allowed``."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {sorted(allowed)}")


# ------------------------------------------------------------------------------ input size


def _input_size_error(
    value: Any, name: str, dims: int | None, channels: Sequence[int] | None
) -> ValueError:
    expected = "C,H,W, three positive integers" if dims == 3 else "positive integers"
    if channels:
        expected += f" with C {' or '.join(map(str, channels))}"
    return ValueError(f"bad {name} {value!r}: expected {expected} such as 3,32,32")


def parse_input_size(text: str | None, name: str = "--input-size") -> tuple[int, int, int] | None:
    """``"3,32,32"`` (or ``"3x32x32"``) to ``(3, 32, 32)``; None stays None.

    Raises:
        ValueError: not three positive integers; the one message of :func:`check_input_size`.
    """
    if text is None:
        return None
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise _input_size_error(text, name, 3, None)
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def check_input_size(
    input_size: Any,
    *,
    name: str = "input_size",
    dims: int | None = 3,
    channels: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """``input_size`` as a tuple of positive ints, or a ValueError that says what is expected.

    Args:
        input_size: one input without the batch dimension, e.g. ``(3, 32, 32)``.
        name: how the message calls the value (``"input_size"``, ``"--input-size"``).
        dims: the required length; None accepts any non-empty one (``(30,)`` for a linear model).
        channels: the allowed values of the first entry, e.g. ``(1, 3)``.
    """
    try:
        size = tuple(_index(s) for s in input_size)
    except TypeError:
        raise _input_size_error(input_size, name, dims, channels) from None
    if (
        not size
        or (dims is not None and len(size) != dims)
        or any(s < 1 for s in size)
        or (channels and size[0] not in channels)
    ):
        raise _input_size_error(input_size, name, dims, channels)
    return size


def _index(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not a size")
    return operator.index(value)


# ------------------------------------------------------------------------------ records


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_DISTRIBUTIONS = {
    "torchvision": "torchvision",
    "numpy": "numpy",
    "thop": "ultralytics-thop",
    "ptflops": "ptflops",
    "tensorly": "tensorly",
    "scikit-learn": "scikit-learn",
}


def versions() -> dict[str, str | None]:
    """Versions of torch, torchvision, decomp, Python, NumPy, thop, ptflops, tensorly and
    scikit-learn (None for one that is not installed), read without importing them."""
    import decomp

    found = {key: _dist_version(dist) for key, dist in _DISTRIBUTIONS.items()}
    return {
        "torch": str(torch.__version__),
        "decomp": decomp.__version__,
        "python": platform.python_version(),
        **found,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine now: platform, CPU model, CPU counts, torch threads, CUDA device, load, time.

    Returns:
        ``{"platform", "cpu", "cpu_count", "cpus_usable", "torch_threads", "cuda" (the first
        device's name or None), "load_average" (1, 5, 15 min, or None), "timestamp" (UTC, ISO
        8601)}``.
    """
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": load,
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def environment() -> dict[str, Any]:
    """``{"versions": versions(), "machine": machine()}``, for results files."""
    return {"versions": versions(), "machine": machine()}


def plain(value: Any) -> Any:
    """``value`` as JSON data: mappings with string keys, lists, numbers, strings, None.

    Tuples and sets become lists, NumPy and torch values Python ones, NaN and infinities None
    (JSON has no such numbers), anything else (paths, enums...) its ``str``.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # NumPy and torch values
        return plain(value.tolist())
    return str(value)


# ------------------------------------------------------------------------------ outputs


def select_output(value: Any, key: str | int | None = None) -> Tensor:
    """The one tensor of a model's output that decomp measures: the output itself when it is a
    tensor; else the first (or ``key``-named) entry of a tuple, list or dict, such as the logits
    of a model that also returns auxiliary outputs.

    Raises:
        ValueError: the output holds no such tensor; the message says what it was and how to
            name another entry.
    """
    if isinstance(value, Tensor) and key is None:
        return value
    if isinstance(value, Mapping):
        keys = list(value)
        picked = value.get(key) if key is not None else (value[keys[0]] if keys else None)
        where = f"dict with keys {keys}"
    elif isinstance(value, list | tuple):
        index = 0 if key is None else _output_index(key, len(value))
        picked = value[index] if index is not None and index < len(value) else None
        where = f"{type(value).__name__} of {len(value)}"
    else:
        picked, where = None, type(value).__name__
    if not isinstance(picked, Tensor):
        wanted = "its first entry" if key is None else f"entry {key!r}"
        raise ValueError(
            f"the model returned a {where}; {wanted} is not a tensor: name the output to use "
            "(a dict key or a tuple index, --model-output on the command line)"
        )
    return picked


def _output_index(key: str | int, length: int) -> int | None:
    try:
        index = int(key)
    except (TypeError, ValueError):
        return None
    return index if -length <= index < length else None
