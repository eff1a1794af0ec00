"""Model files: load three kinds safely, save decomp files atomically.

:func:`load` takes

1. a **decomp file** (written by :func:`save`): plain data and tensors, ``{"format": "decomp",
   "format_version": 1, "arch": {"factory": "pkg.module:callable", "kwargs": {...}}, "plans":
   [...], "state_dict": {...}, "input_size", "class_names", "versions", "source_sha256",
   "extra"}``. Loading it imports the factory, builds the base model, applies each plan
   structurally (no decomposition work) and loads the state_dict strictly. ``torch.load`` runs
   with ``weights_only=True``, so no code from the file runs; and since the file names the
   factory and its arguments, only nn.Module classes and functions annotated to return an
   nn.Module (torchvision's builders are) are called on the file's word; any other factory must
   be confirmed with ``arch=``/``--arch``, and standard-library modules are never imported for
   it. (What remains: a crafted file can call any installed Module class or Module-returning
   function with arguments of its choosing.)
2. a **state_dict** (``torch.save(model.state_dict(), path)``, also one nested under "state_dict",
   "model_state_dict" or "model") plus an architecture reference ``arch="module:factory"`` and
   ``arch_kwargs``.
3. a **whole pickled module** (``torch.save(model)``), only with ``trust_pickle=True``: unpickling
   runs code named by the file. Without the flag it is detected (``weights_only`` loading
   refuses it, or its globals are listed without being run) and refused.

The loaded model is in eval mode and carries its metadata (``_decomp_arch``, ``_decomp_meta``,
and the applied plans in ``_decomp_plans``), which :func:`decomp.apply` keeps on its copy, so
``save(decompose(load(path)), out)`` needs no further arguments.

A model with no architecture reference (one that came from a trusted pickle, or any model with
``allow_pickle=True``) is saved as a whole pickle again, ``torch.save(model)``, with a warning: such
a file again needs ``trust_pickle=True`` to load.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decomp._utils import PathLike, atomic_write, check_input_size, versions
from decomp.arch import (
    DecompFileError,
    arch_ref,
    build_arch,
    check_file_factory,
    describe_arch,
)
from decomp.plan import Plan, applied_plans, apply

logger = logging.getLogger(__name__)

FORMAT = "decomp"
FORMAT_VERSION = 1
ARCH_ATTR = "_decomp_arch"
META_ATTR = "_decomp_meta"
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_THOP_KEYS = ("total_ops", "total_params")
_SHOW = 3  # how many keys an error message names


# ------------------------------------------------------------------------ metadata


def model_meta(model: nn.Module) -> dict[str, Any]:
    """The metadata :func:`load` attaches to a model (a copy): ``kind``, ``input_size``,
    ``class_names``, ``versions``, ``extra`` (what the file's writer recorded), ``source_path``
    and ``source_sha256``; empty for a model that did not come from :func:`load`."""
    return dict(getattr(model, META_ATTR, None) or {})


def model_arch(model: nn.Module) -> dict[str, Any] | None:
    """The architecture reference a loaded model was built from, or None (a pickle)."""
    return getattr(model, ARCH_ATTR, None)


def recorded_input_size(model: nn.Module) -> list[int] | None:
    """The input size a loaded model records: its file's, else its last applied plan's."""
    plans = applied_plans(model)
    size = model_meta(model).get("input_size") or (plans[-1].get("input_size") if plans else None)
    return list(size) if size else None


def _rebuild(arch: Mapping[str, Any], plans: Sequence[Mapping[str, Any]]) -> nn.Module:
    """The base model with every plan applied structurally (uninitialised factors)."""
    model = build_arch(arch)
    for data in plans:
        try:
            model = apply(model, Plan.from_dict(dict(data)), inplace=True, init="structure")
        except (ValueError, TypeError) as exc:
            raise DecompFileError(
                f"the stored plan does not fit {describe_arch(arch)}: {exc}"
            ) from None
    return model


# --------------------------------------------------------------------------- state_dict


def _mismatches(model: nn.Module, state: Mapping[str, Any]) -> str:
    """Empty when ``state`` fits ``model`` exactly, else the first few differences, in words."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state
        and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if keys:
            more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOW])}{more}")
    return "; ".join(parts)


def _drop_thop_keys(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the total_ops/total_params buffers that thop.profile leaves in a state_dict."""
    own = model.state_dict()
    junk = [k for k in state if k.rsplit(".", 1)[-1] in _THOP_KEYS and k not in own]
    if junk:
        logger.warning(
            "ignoring %d thop counter buffers in the state_dict (%s)", len(junk), junk[0]
        )
    return {k: v for k, v in state.items() if k not in junk}


def _load_state(model: nn.Module, state: Mapping[str, Any], what: str, source: str) -> None:
    state = _drop_thop_keys(model, state)
    problems = _mismatches(model, state)
    if problems:
        raise DecompFileError(
            f"the weights in {source} do not fit {what}: {problems}; check --arch and --arch-kwargs"
        )
    model.load_state_dict(state, strict=True)


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """``obj`` as a state_dict (also one nested under a usual key), or None."""
    if _is_state_dict(obj):
        state = dict(obj)
    else:
        key = next((k for k in _NESTED_KEYS if isinstance(obj, Mapping) and k in obj), None)
        if key is None or not _is_state_dict(obj[key]):
            return None
        logger.info("using the state_dict stored under %r", key)
        state = dict(obj[key])
    if all(k.startswith("module.") for k in state):
        logger.info("stripping the 'module.' prefix that DataParallel/DDP left on every key")
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {list(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:_SHOW]]
        return f"a dict with keys {keys}" if obj else "an empty dict"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


# ------------------------------------------------------------------------------ reading


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_input_path(path: PathLike) -> Path:
    """Check that ``path`` is a non-empty file, with an error that says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise DecompFileError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise DecompFileError(f"{path} is a directory, not a model file; give the .pt file in it")
    if path.stat().st_size == 0:
        raise DecompFileError(
            f"{path} is empty (0 bytes): it was not written completely; save the model again"
        )
    return path


def _pickle_refusal(path: Path, names: Sequence[str]) -> DecompFileError:
    names = sorted(set(names), key=lambda n: (n.startswith("torch."), n))  # the telling ones first
    what = f" (it references {', '.join(names[:_SHOW])})" if names else ""
    return DecompFileError(
        f"{path} is a pickled Python object{what}, and loading it runs code from the file; "
        "if you trust the file pass --trust-pickle (trust_pickle=True), or better re-save it as a "
        "state_dict with torch.save(model.state_dict(), path) and pass --arch MODULE:FACTORY"
    )


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a zip checkpoint needs beyond weights_only's allowlist, found without running any."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a TorchScript archive or a damaged zip: torch.load will say which
        return []


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(path: Path, exc: BaseException) -> DecompFileError:
    return DecompFileError(
        f"{path} is not a readable PyTorch file (truncated, corrupt, or another format: "
        f"{_first_line(exc)}); save it again with torch.save"
    )


def _read(path: Path, trust_pickle: bool, map_location: Any) -> tuple[Any, bool]:
    """``(object, pickled)``: the file's object, and whether it needed a full unpickling."""
    names = _unsafe_globals(path)
    if not names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4" and the like
                return torch.load(path, map_location=map_location, weights_only=True), False
        except pickle.UnpicklingError as exc:
            if "weights only load failed" not in str(exc).lower():
                raise _corrupt(path, exc) from None
            found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
            names = found or []
        except RuntimeError as exc:
            if "torchscript" in str(exc).lower():
                raise DecompFileError(
                    f"{path} is a TorchScript archive (torch.jit.save); decomp works on eager "
                    "models: give the model's state_dict and --arch MODULE:FACTORY"
                ) from None
            raise _corrupt(path, exc) from None
        except Exception as exc:
            raise _corrupt(path, exc) from None
    if not trust_pickle:
        raise _pickle_refusal(path, names)
    logger.warning("%s: unpickling a trusted file (this runs code from it)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.load(path, map_location=map_location, weights_only=False), True
    except Exception as exc:
        raise DecompFileError(f"{path}: unpickling failed: {_first_line(exc)}") from None


# ------------------------------------------------------------------------------ loading


def load(
    path: PathLike,
    *,
    arch: str | Mapping[str, Any] | None = None,
    arch_kwargs: Mapping[str, Any] | str | None = None,
    trust_pickle: bool = False,
    map_location: Any = "cpu",
) -> nn.Module:
    """Load a model from a decomp file, a state_dict plus ``arch``, or a trusted pickle.

    Args:
        path: the file.
        arch: ``"module:factory"`` that builds the model (needed for a state_dict; overrides the
            reference stored in a decomp file; lets a trusted pickle be saved safely later).
        arch_kwargs: keyword arguments of the factory, a dict or JSON text.
        trust_pickle: allow unpickling a whole module, which runs code named by the file.
        map_location: as in ``torch.load``.

    Returns:
        The model in eval mode, carrying its metadata for :func:`save`.

    Raises:
        DecompFileError: the file is missing, empty, corrupt, untrusted, not a model, or does not
            fit the architecture; the message says what to do.
    """
    path = Path(path)
    if arch_kwargs is not None and arch is None:
        raise DecompFileError(
            "architecture kwargs need an architecture: pass --arch MODULE:FACTORY"
        )
    ref = arch_ref(arch, arch_kwargs) if arch is not None else None
    check_input_path(path)
    obj, pickled = _read(path, trust_pickle, map_location)
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        model, ref, meta = _from_decomp(obj, ref, path)
        kind = "decomp"
    elif isinstance(obj, nn.Module) and pickled:
        model, ref, meta = _from_pickle(obj, ref, path)
        kind = "pickle"
    else:
        state = _as_state_dict(obj)
        if state is None:
            raise DecompFileError(
                f"{path} holds {_describe(obj)}, not a model: expected a decomp file, a "
                "state_dict (with --arch MODULE:FACTORY) or a pickled nn.Module"
            )
        if ref is None:
            raise DecompFileError(
                f"{path} holds a state_dict, which does not say what architecture it belongs to: "
                "pass --arch MODULE:FACTORY (e.g. torchvision.models:resnet18) and, if needed, "
                """--arch-kwargs '{"num_classes": 9}'"""
            )
        model = build_arch(ref)
        _load_state(model, state, describe_arch(ref), str(path))
        kind = "state_dict"
    meta.update(kind=kind, source_path=str(path.resolve()), source_sha256=file_sha256(path))
    setattr(model, ARCH_ATTR, ref)
    setattr(model, META_ATTR, meta)
    logger.info("loaded %s (%s)", path, kind)
    return model.eval()


def _from_decomp(
    payload: Mapping[str, Any], ref: dict | None, path: Path
) -> tuple[nn.Module, dict, dict]:
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DecompFileError(
            f"{path} is a decomp file of format version {version!r}; this decomp reads up to "
            f"{FORMAT_VERSION}: upgrade decomp"
        )
    state, plans = payload.get("state_dict"), payload.get("plans", [])
    if not isinstance(state, Mapping) or not isinstance(plans, list):
        raise DecompFileError(
            f"{path} is a damaged decomp file (no state_dict or plans); save it again"
        )
    stored = payload.get("arch")
    if ref is not None and stored and arch_ref(stored) != ref:
        logger.warning("%s: using --arch %s instead of the stored %s", path, ref, stored)
    if ref is None:
        ref = arch_ref(stored or "")
        check_file_factory(ref["factory"], path)
    model = _rebuild(ref, plans)
    _load_state(model, state, describe_arch(ref), str(path))
    meta = {
        key: copy.deepcopy(payload.get(key))
        for key in ("input_size", "class_names", "versions", "extra")
    }
    meta["extra"] = meta["extra"] or {}
    return model, ref, meta


def _from_pickle(
    model: nn.Module, ref: dict | None, path: Path
) -> tuple[nn.Module, dict | None, dict]:
    """A trusted pickled module; with ``ref``, check that it rebuilds the module, for safe saves."""
    meta = model_meta(model)
    ref = ref or model_arch(model)
    if ref is not None:
        rebuilt = _rebuild(ref, applied_plans(model))
        problems = _mismatches(rebuilt, model.state_dict())
        if problems:
            raise DecompFileError(
                f"--arch {describe_arch(ref)} does not rebuild the module pickled in {path}: "
                f"{problems}; fix --arch/--arch-kwargs or leave them out"
            )
    meta.setdefault("extra", {})
    return model, ref, meta


# ------------------------------------------------------------------------------ writing


def check_output_path(path: PathLike, source: PathLike | None = None) -> Path:
    """Check, before any work, that ``path`` can be written and is not ``source``.

    Probes the folder by creating and removing a temporary file in it.

    Raises:
        DecompFileError: the folder is missing or not writable, ``path`` is a directory, or it
            is the input file.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DecompFileError(f"output {path} is a directory; give a file path")
    if source is not None and _same_file(path, Path(source)):
        raise DecompFileError(
            f"output {path} is the input file; choose another output path "
            "(decomp never overwrites its input)"
        )
    if not folder.exists():
        raise DecompFileError(
            f"cannot write {path}: folder {folder} does not exist; create it or choose another path"
        )
    if not folder.is_dir():
        raise DecompFileError(f"cannot write {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise DecompFileError(
            f"cannot write to folder {folder} ({exc.strerror or exc}); choose another output path"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is data that ``torch.load(weights_only=True)`` reads."""
    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings; got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored; use plain data or tensors")


def save(
    model: nn.Module,
    path: PathLike,
    *,
    arch: str | Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    source: PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Save ``model`` as a decomp file, atomically.

    Whatever is not given comes from the model's metadata (set by :func:`load`) and its applied
    plans. The file is checked to rebuild the model before it is written.

    Args:
        model: a model built by ``arch``, possibly with plans applied.
        path: where to write; never ``source``.
        arch: ``"module:factory"`` or ``{"factory": ..., "kwargs": {...}}``.
        input_size: (C, H, W) the model expects; default: from the metadata or the last plan.
        class_names: class names, when known.
        source: the file the model came from (its SHA-256 is stored); default: the loaded file.
        extra: more plain data to store (merged over the loaded file's extra), e.g.
            ``{"bn_calibrated": True}``.
        allow_pickle: with no architecture reference, save the whole module as a pickle
            (``torch.save(model)``) instead of failing; a model that came from a trusted pickle
            is saved that way anyway, with a warning.

    Returns:
        The path written.
    """
    meta = model_meta(model)
    source = source if source is not None else meta.get("source_path")
    path = check_output_path(path, source)
    ref = arch_ref(arch) if arch is not None else model_arch(model)
    if ref is None:
        return _save_pickle(model, path, meta, allow_pickle)
    plans = applied_plans(model)
    extra_all = {**(meta.get("extra") or {}), **dict(extra or {})}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": ref,
        "plans": plans,
        "state_dict": dict(model.state_dict()),
        "input_size": _input_size(input_size or recorded_input_size(model)),
        "class_names": list(class_names) if class_names is not None else meta.get("class_names"),
        "versions": versions(),
        "source_sha256": _source_hash(source, meta),
        "extra": extra_all,
    }
    for key, value in payload.items():
        if key != "state_dict":
            _check_plain(value, key)
    problems = _mismatches(_rebuild(ref, plans), payload["state_dict"])
    if problems:
        raise DecompFileError(
            f"{describe_arch(ref)} plus the applied plans does not rebuild this model "
            f"({problems}), so the file would not load; pass the architecture that built it"
        )
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    logger.info("saved %s", path)
    return path


def _input_size(size: Sequence[int] | None) -> list[int] | None:
    return None if size is None else list(check_input_size(size))


def _source_hash(source: PathLike | None, meta: Mapping[str, Any]) -> str | None:
    if source is not None and Path(source).is_file():
        if meta.get("source_path") == str(Path(source).resolve()) and meta.get("source_sha256"):
            return meta["source_sha256"]
        return file_sha256(source)
    return meta.get("source_sha256")


def _save_pickle(model: nn.Module, path: Path, meta: Mapping[str, Any], allow: bool) -> Path:
    if not (allow or meta.get("kind") == "pickle"):
        raise DecompFileError(
            "the model has no architecture reference, so a decomp file could not rebuild it: "
            "pass arch='module:factory' (command line: --arch MODULE:FACTORY), or "
            "allow_pickle=True to save a pickle"
        )
    logger.warning(
        "%s: no architecture reference, so the model is saved as a whole pickle, which needs "
        "--trust-pickle to load; pass --arch MODULE:FACTORY for a safe decomp file",
        path,
    )
    atomic_write(path, lambda tmp: torch.save(model, tmp))
    return path
