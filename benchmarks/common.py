"""Shared pieces of the benchmark scripts: result files, markdown tables, isolated peak memory.

Results are data (STYLE.md item 12). Each script writes one JSON file

    {"meta": {"config", "versions", "machine", "timestamp", ...}, "rows": [...], <more sections>}

atomically, then renders its markdown *from the JSON it just wrote* with :func:`render_table`, so a
table is never typed by hand and can always be rebuilt from the file.

Peak memory. ``tracemalloc`` does not see torch's allocations, so the peak is read from the kernel:
the ``VmHWM`` ("high water mark", peak resident set size) line of ``/proc/self/status`` in a child
process. Each measurement runs in its own child (:func:`run_isolated`), started from a forkserver
that has already imported torch, so a child costs a fraction of a second instead of a fresh
interpreter's seconds. Inside the child, :meth:`MemoryProbe.section` writes ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0), which resets VmHWM to the current RSS, so the section's
peak excludes the imports and the setup (building the model) before it; it reports
``peak_delta_mb = VmHWM after - VmRSS before``. Where the reset is refused the record says
``hwm_reset: false`` and the delta is an upper bound (the setup's peak may be in it); where
``/proc`` is missing it falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (never reset).
RSS counts every page torch touched, CPU tensors included; memory freed by an earlier section but
kept by the allocator can hide part of a later peak, so measure one section per child.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decomp._utils import atomic_write_text, plain

if TYPE_CHECKING:
    from torch import nn

    from decomp.plan import Plan

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
"""Where the scripts write by default (``--output`` overrides)."""

_PRELOAD = ["torch", "torchvision", "numpy", "tensorly", "decomp.metrics", "decomp._tensorly"]
_CONTEXT: Any = None


# --------------------------------------------------------------------------- metadata


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the benchmarks use and compare, read without importing
    them: decomp's environment record plus tensorly-torch (importing it would switch tensorly's
    global backend as a side effect)."""
    from decomp._utils import versions

    try:
        tltorch = metadata.version("tensorly-torch")
    except metadata.PackageNotFoundError:
        tltorch = None
    return {**versions(), "tltorch": tltorch}


def _git_commit() -> str | None:
    """HEAD of the repository the benchmarks live in (read-only), or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """decomp's machine record (platform, CPU model and counts, torch threads, CUDA device, load,
    UTC time) plus ``cuda_available`` and ``device_name`` (the GPU's name, else the CPU's)."""
    from decomp._utils import machine

    info = machine()
    gpu = info["cuda"]
    return {**info, "cuda_available": gpu is not None, "device_name": gpu or info["cpu"]}


def shown_path(path: str | Path) -> str:
    """``path`` relative to the repository when it names something inside it, else as given:
    results name no folder of the machine that wrote them."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def make_meta(config: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``meta`` block: config, versions, machine, UTC timestamp, git commit, command line."""
    machine = machine_info()
    return {
        "config": dict(config),
        "versions": library_versions(),
        "machine": machine,
        "timestamp": machine["timestamp"],
        "git_commit": _git_commit(),
        "argv": [shown_path(a) for a in sys.argv],
        **extra,
    }


# --------------------------------------------------------------------------- files


def write_results(
    path: str | Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], **sections: Any
) -> dict[str, Any]:
    """Write ``{"meta", "rows", **sections}`` to ``path`` atomically; return what was written."""
    payload = plain({"meta": meta, "rows": list(rows), **sections})
    atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False) + "\n", parents=True)
    return payload


def read_results(path: str | Path) -> dict[str, Any]:
    """Load a results file written by :func:`write_results`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_text(path: str | Path, text: str) -> None:
    """Write a rendered report atomically."""
    atomic_write_text(path, text, parents=True)


# --------------------------------------------------------------------------- markdown


@dataclass(frozen=True)
class Column:
    """One markdown column: the row key, its header, and how to format the value.

    ``fmt`` is a format spec (``".3f"``, ``",d"``) or a callable; ``None`` values print as ``-``.
    """

    key: str
    header: str | None = None
    fmt: str | Callable[[Any], str] = ""


def _cell(value: Any, fmt: str | Callable[[Any], str]) -> str:
    """Format one cell; lists are joined with commas; pipes are escaped."""
    if value is None:
        return "-"
    if callable(fmt):
        text = fmt(value)
    elif isinstance(value, (list, tuple)):
        text = "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else ""
        text = text or ", ".join(str(v) for v in value)
    elif isinstance(value, bool) or not fmt:
        text = str(value)
    else:
        try:
            text = format(value, fmt)
        except (TypeError, ValueError):
            text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column | str]) -> str:
    """A GitHub markdown table of ``rows`` with the caller's ``columns`` (missing keys print ``-``).

    Args:
        rows: dicts, e.g. the ``rows`` of a results file.
        columns: :class:`Column` objects, or bare keys (header = key, default formatting).

    Returns:
        The table, one line per row, ending with a newline.
    """
    cols = [Column(c) if isinstance(c, str) else c for c in columns]
    head = "| " + " | ".join(c.header or c.key for c in cols) + " |"
    rule = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_cell(r.get(c.key), c.fmt) for c in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def render_meta(meta: Mapping[str, Any]) -> str:
    """A short markdown paragraph naming the machine, versions and config of a run."""
    machine, versions = meta.get("machine", {}), meta.get("versions", {})
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    config = ", ".join(f"{k}={v}" for k, v in meta.get("config", {}).items())
    return (
        f"Run {meta.get('timestamp', '?')} (commit {str(meta.get('git_commit'))[:10]}) on "
        f"{machine.get('device_name', '?')}, {machine.get('cpus_usable')} usable CPUs, "
        f"{machine.get('torch_threads')} torch threads, load {machine.get('load_average')}.\n\n"
        f"Versions: {libs}.\n\nConfig: {config}.\n"
    )


# --------------------------------------------------------------------------- peak memory


def _proc_status_mb() -> dict[str, float] | None:
    """VmRSS and VmHWM of this process in MiB, or None without /proc."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) / 1024.0  # reported in kB
    return out if len(out) == 2 else None


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _maxrss_mb() -> float:
    """Peak RSS from getrusage (kB on Linux, bytes on macOS), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


@dataclass
class MemoryProbe:
    """Records the peak resident memory of named sections of code in this process."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Measure the peak RSS reached inside the ``with`` block (see the module docstring)."""
        reset = _reset_hwm()
        before = _proc_status_mb()
        start_rss = before["VmRSS"] if before else _maxrss_mb()
        try:
            yield
        finally:
            after = _proc_status_mb()
            peak = after["VmHWM"] if after else _maxrss_mb()
            self.sections[name] = {
                "peak_rss_mb": round(peak, 1),
                "start_rss_mb": round(start_rss, 1),
                "peak_delta_mb": round(max(peak - start_rss, 0.0), 1),
                "hwm_reset": reset,
                "source": "VmHWM" if after else "ru_maxrss",
            }


@dataclass
class IsolatedResult:
    """What a child run returned: its status, value (``None`` unless ok), memory, wall time."""

    status: str  # "ok" | "error" | "timeout" | "died"
    value: Any = None
    error: str | None = None
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0


def _context() -> Any:
    """A forkserver multiprocessing context whose server has torch imported once."""
    global _CONTEXT
    if _CONTEXT is None:
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        _CONTEXT = mp.get_context(method)
        if method == "forkserver":
            _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


def _child_main(conn: Any, target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Run ``target(probe=..., **kwargs)`` and send back (status, value, error, memory)."""
    probe = MemoryProbe()
    try:
        value = target(probe=probe, **kwargs)
        conn.send(("ok", value, None, probe.sections))
    except BaseException:  # report everything, the parent decides
        conn.send(("error", None, traceback.format_exc(limit=8), probe.sections))
    finally:
        conn.close()


def run_isolated(
    target: Callable[..., Any], timeout: float | None = None, **kwargs: Any
) -> IsolatedResult:
    """Run ``target(probe=MemoryProbe(), **kwargs)`` in a fresh child process.

    ``target`` must be a module-level function (it is pickled by reference) that wraps the part
    to measure in ``with probe.section(name):``; its return value must be picklable (plain
    numbers and dicts are best). The child is terminated after ``timeout`` seconds.

    Returns:
        The :class:`IsolatedResult`; ``memory`` maps section names to their peaks.
    """
    ctx = _context()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(child_conn, target, kwargs), daemon=True)
    start = time.perf_counter()
    process.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout):
            _stop(process)
            return IsolatedResult("timeout", error=f"no result after {timeout} s")
        try:
            status, value, error, memory = parent_conn.recv()
        except EOFError:
            process.join(5)
            return IsolatedResult("died", error=f"child exited with code {process.exitcode}")
    finally:
        parent_conn.close()
    process.join(30)
    if process.is_alive():
        _stop(process)
    return IsolatedResult(status, value, error, memory, time.perf_counter() - start)


def _stop(process: Any) -> None:
    """Terminate a child this module started, then kill it if it lingers."""
    process.terminate()
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


# --------------------------------------------------------------------------- small helpers


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())`` by ``time.perf_counter``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def apply_within_budget(
    net: nn.Module, plan: Plan, budget_s: float | None
) -> tuple[list[str], list[dict[str, str]], bool]:
    """Apply ``plan`` one layer at a time (in place, in model order) until ``budget_s`` is spent.

    CP-ALS on large layers can take minutes; a benchmark row with a time budget factorizes what
    fits and leaves the rest dense (and says so).

    Returns:
        ``(names done, [{"layer", "error"}] for layers whose factorization failed, budget hit)``.
    """
    from decomp.plan import apply

    done, failed, start = [], [], time.perf_counter()
    for lp in plan.decomposed:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            return done, failed, True
        try:
            apply(net, replace(plan, layers=[lp]), inplace=True)
        except ValueError as exc:  # CP-ALS divergence is a ValueError naming the layer
            failed.append({"layer": lp.name, "error": str(exc)})
            continue
        done.append(lp.name)
    return done, failed, False


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)
