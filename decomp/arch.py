"""Architecture references: ``{"factory": "module:callable", "kwargs": {...}}``, resolved and built.

A decomp file names the callable that builds its base model instead of pickling code, so loading
it imports a module and calls a factory. This module parses such references, imports and calls
them with errors that say how to fix them, and decides which factories a *file* may name on its
own word: only nn.Module classes and functions annotated to return an nn.Module (torchvision's
builders are), never anything from the standard library.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import re
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn


class DecompFileError(ValueError):
    """A model file (or the architecture it names) that cannot be read or written; the message
    says what to do instead."""


def arch_ref(arch: str | Mapping[str, Any], kwargs: Mapping[str, Any] | str | None = None) -> dict:
    """Normalise an architecture reference to ``{"factory": "module:callable", "kwargs": {...}}``.

    Args:
        arch: ``"module:callable"`` (``callable`` may be dotted, ``"pkg.mod:Class.build"``), or a
            dict with "factory" and optional "kwargs".
        kwargs: keyword arguments for the factory, a dict or its JSON text; they must be plain
            JSON data so that a decomp file can hold them.
    """
    if isinstance(arch, Mapping):
        if kwargs is None:
            kwargs = arch.get("kwargs") or {}
        arch = arch.get("factory", "")
    if not isinstance(arch, str) or not re.fullmatch(r"[\w.]+:[\w.]+", arch.strip()):
        raise DecompFileError(
            f"bad architecture reference {arch!r}: expected MODULE:FACTORY, "
            "e.g. torchvision.models:resnet18 or mypkg.models:build"
        )
    return {"factory": arch.strip(), "kwargs": _check_kwargs(kwargs)}


def _check_kwargs(kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise DecompFileError(
                f"architecture kwargs are not valid JSON ({exc}); "
                """expected an object such as '{"num_classes": 9}'"""
            ) from None
    if not isinstance(kwargs, Mapping):
        raise DecompFileError(
            f"architecture kwargs must be a JSON object such as '{{\"num_classes\": 9}}'; "
            f"got {type(kwargs).__name__} {kwargs!r}"
        )
    try:
        return json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError) as exc:
        raise DecompFileError(f"architecture kwargs must be plain JSON data: {exc}") from None


def describe_arch(arch: Mapping[str, Any]) -> str:
    """``module:factory(key=value, ...)``, for messages."""
    args = ", ".join(f"{k}={v!r}" for k, v in arch.get("kwargs", {}).items())
    return f"{arch['factory']}({args})"


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import ``module:callable`` and return the callable, with an error that says how to fix it."""
    module_name, _, attr_path = arch_ref(spec)["factory"].partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise DecompFileError(
            f"cannot import {module_name!r} for --arch {spec} ({exc}); check the spelling, install "
            "the package, or run from the folder that holds the module"
        ) from None
    except Exception as exc:
        raise DecompFileError(
            f"importing {module_name!r} for --arch {spec} failed: {type(exc).__name__}: {exc}"
        ) from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DecompFileError(f"{module_name!r} has no attribute {attr_path!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DecompFileError(
            f"--arch {spec} names a {type(obj).__name__}, not a callable that builds the model"
        )
    return obj


def accepts_kwarg(factory: Callable[..., Any], name: str) -> bool:
    """Whether ``factory`` takes a keyword argument ``name`` (or any, through ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def build_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Call the factory of an architecture reference (see :func:`arch_ref`) and check the result."""
    arch = arch_ref(arch)
    factory = resolve_factory(arch["factory"])
    try:
        model = factory(**arch["kwargs"])
    except Exception as exc:
        raise DecompFileError(
            f"{describe_arch(arch)} raised {type(exc).__name__}: {exc}; check --arch-kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise DecompFileError(
            f"{describe_arch(arch)} returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def check_file_factory(spec: str, path: Path) -> None:
    """Refuse to call a factory named by a file unless it is an nn.Module class or a function
    annotated to return one (as torchvision's builders are): a file must not be able to name
    ``os:system`` and its argument. Standard-library modules are refused before any import.
    """
    top = spec.partition(":")[0].split(".")[0]
    if top not in sys.stdlib_module_names and top != "builtins":
        if _builds_modules(resolve_factory(spec)):
            return
    raise DecompFileError(
        f"{path} asks to build its model by calling {spec}, and decomp calls only nn.Module "
        "classes and functions annotated to return one on a file's word; if you trust the "
        f"file, confirm with --arch {spec} (arch={spec!r})"
    )


def _builds_modules(obj: Any) -> bool:
    """An nn.Module class, or a plain function whose return annotation is one."""
    if isinstance(obj, type):
        return issubclass(obj, nn.Module)
    if not inspect.isfunction(obj):
        return False
    try:
        returns = typing.get_type_hints(obj).get("return")
    except Exception:  # an annotation that does not resolve: not a promise we can check
        return False
    return isinstance(returns, type) and issubclass(returns, nn.Module)
