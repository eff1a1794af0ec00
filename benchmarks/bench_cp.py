"""CP-ALS speed and error: decomp's ``cp_factors`` against tensorly's ``parafac``, layer by layer.

For every ungrouped kxk conv of resnet18, resnet50 and vgg16 (torchvision architectures, random
weights after ``torch.manual_seed(0)``, never downloaded) and every rank spec (``ratio:0.3``,
``vbmf``; the CP rank is what ``decomp.plan.select_ranks`` gives for the spec, rank 0 is
reported and skipped), the two solvers run back to back on the same kernel, each in a child
process of its own (its time and peak memory are its own, see :mod:`benchmarks.common`), the
order alternating from layer to layer. Both run on one torch thread, tensorly at its defaults
(``init='svd'``, 100 iterations, ``tol=1e-8``), decomp at its own. The error is
``||W - W_hat||_F / ||W||_F`` in float64.

tensorly needs minutes for a 512-channel layer, so the run is resumable: each row is written to
the JSON as soon as it is measured, and a rerun skips the rows it finds (``--fresh`` starts over).

Two more sections:

- ``memory``: the peak memory added by ``decomp.plan.decompose(resnet18, "cp", "ratio:0.3")`` at
  64 x 64 in a child process (the bench-speed measurement), and its time; and the time of the
  command line ``decompose sd.pt --arch torchvision.models:resnet18 --method cp --rank ratio:0.3
  --input-size 3,64,64``.
- ``threads``: the thread trap behind ``decomp.factorize.linalg.solver_threads``: eigensolves and
  CP-ALS runs timed with 1 and 2 torch threads (the policy switched off), on the machine as it is
  ("idle": no competitor of ours) and beside one CPU-bound process this script starts
  ("loaded"), and with 2 threads and the policy on.

Writes ``cp_speed.json`` and ``cp_speed.md`` (``cp_speed_quick.*`` with ``--quick``: resnet18's
layers of at most 128 channels, smaller thread measurements). Usage, from the repository root::

    python -m benchmarks.bench_cp            # everything (hours: tensorly's parafac is slow)
    python -m benchmarks.bench_cp --quick    # a few minutes
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    Column,
    MemoryProbe,
    make_meta,
    ratio,
    read_results,
    render_meta,
    render_table,
    run_isolated,
    write_results,
    write_text,
)

MODELS = ("resnet18", "resnet50", "vgg16")
TRAINED = {"demo_resnet18": "runs/demo/baseline.pt"}
"""Trained models, by choice (``--models demo_resnet18``): random weights are noise to EVBMF, so
``vbmf`` ranks every random layer 0; the demo's trained ResNet-18 (``make demo``) has real ones."""
SPECS = ("ratio:0.3", "vbmf")
QUICK_MAX_CHANNELS = 128
TARGET_SPEEDUP = 10.0
MEAN_SLACK = 0.005
"""decomp's mean error may exceed tensorly's by this share of it."""
LAYER_SLACK = 0.01
"""No layer's error may exceed tensorly's by more than this share of it."""
MEMORY_LIMIT_MB = 300.0
CLI_LIMIT_S = 60.0
INPUT_SIZE = (3, 64, 64)


# --------------------------------------------------------------------------- layers


def build_model(name: str) -> nn.Module:
    """A torchvision model with random weights (seed 0), never downloaded; or a trained one of
    :data:`TRAINED`, from its file."""
    import torchvision

    if name in TRAINED:
        import decomp

        path = REPO / TRAINED[name]
        if not path.is_file():
            raise SystemExit(f"{name}: {TRAINED[name]} is missing; run make demo first")
        return decomp.load(path).eval()
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def kxk_convs(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d]]:
    """The ungrouped convs with a kernel larger than 1x1, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size != (1, 1):
            yield name, module


def cp_rank(conv: nn.Conv2d, spec: str) -> int:
    """The CP rank ``decomp.plan`` picks for ``conv`` under ``spec`` (0: EVBMF saw only noise)."""
    from decomp.factorize import registry
    from decomp.plan import select_ranks
    from rank_selection import parse_rank_spec

    return int(select_ranks(conv, registry.get("cp"), parse_rank_spec(spec))[0])


def cases(models: Sequence[str], specs: Sequence[str], quick: bool) -> list[dict[str, Any]]:
    """One case per (model, layer, spec): the kernel and its rank."""
    out = []
    for model in models:
        net = build_model(model)
        for name, conv in kxk_convs(net):
            if quick and max(conv.out_channels, conv.in_channels) > QUICK_MAX_CHANNELS:
                continue
            for spec in specs:
                out.append(
                    {
                        "model": model,
                        "layer": name,
                        "shape": list(conv.weight.shape),
                        "spec": spec,
                        "rank": cp_rank(conv, spec),
                        "weight": conv.weight.detach().clone(),
                    }
                )
    return out


# --------------------------------------------------------------------------- child tasks


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.double()
    return float((w - approx.double()).norm() / w.norm())


def _solver(name: str) -> Callable[[torch.Tensor, int, list[float]], torch.Tensor]:
    """``fit(weight, rank, sweeps) -> approx``: decomp's cp_factors (which logs its sweeps into
    ``sweeps`` through the progress hook) or tensorly's parafac."""
    if name == "decomp":
        from decomp.factorize.cp import cp_factors

        def fit(w: torch.Tensor, rank: int, sweeps: list[float]) -> torch.Tensor:
            return cp_factors(w, rank, progress=lambda _, e: sweeps.append(e)).reconstruct()

        return fit
    from decomp._tensorly import parafac

    def fit(w: torch.Tensor, rank: int, sweeps: list[float]) -> torch.Tensor:
        weights, (a, b, c, d) = parafac(w, rank)
        return torch.einsum("r,or,ir,hr,wr->oihw", weights, a, b, c, d)

    return fit


def task_solve(
    probe: MemoryProbe, solver: str, weight: torch.Tensor, rank: int, threads: int
) -> dict[str, Any]:
    """One CP fit of ``weight``: seconds, relative error, sweeps (decomp), in this child.

    The solver is imported and run once on a small kernel first, so that neither imports nor
    first-call start-up land in the time or the peak memory."""
    torch.set_num_threads(threads)
    fit = _solver(solver)
    torch.manual_seed(0)
    fit(torch.randn(8, 8, 3, 3), 4, [])
    sweeps: list[float] = []
    with probe.section("solve"):
        start = time.perf_counter()
        approx = fit(weight, rank, sweeps)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "error": _relative_error(weight, approx), "sweeps": len(sweeps)}


def task_decompose(probe: MemoryProbe, model: str, threads: int | None) -> dict[str, Any]:
    """``decomp.plan.decompose(model, "cp", "ratio:0.3")`` in place: seconds and layers."""
    from decomp.plan import applied_plans, decompose

    if threads:
        torch.set_num_threads(threads)
    net = build_model(model)
    a = torch.randn(64, 64)
    torch.linalg.eigh(a @ a.T)  # library start-up is not the measurement's
    with probe.section("decompose"):
        start = time.perf_counter()
        decompose(net, "cp", "ratio:0.3", INPUT_SIZE, inplace=True)
        seconds = time.perf_counter() - start
    layers = [lp for lp in applied_plans(net)[-1]["layers"] if lp["method"]]
    return {"seconds": seconds, "n_factorized": len(layers), "threads": torch.get_num_threads()}


def _eigh_input(n: int) -> torch.Tensor:
    torch.manual_seed(0)
    a = torch.randn(n, n + 64)
    return a @ a.T


def _als_input(channels: int) -> torch.Tensor:
    torch.manual_seed(0)
    return nn.Conv2d(channels, channels, 3).weight.detach()


def _thread_op(kind: str, size: int) -> Callable[[], Any]:
    """The timed call of one thread-trap measurement."""
    if kind == "eigh":
        from decomp.factorize.linalg import top_eigvecs

        gram = _eigh_input(size).double()
        return lambda: top_eigvecs(gram, 1)  # one torch.linalg.eigh under the policy
    from decomp.factorize.cp import cp_factors

    weight = _als_input(size)
    rank = round(0.3 * size)
    return lambda: cp_factors(weight, rank, n_iter_max=20)


def task_threads(
    probe: MemoryProbe, kind: str, size: int, threads: int, policy: bool
) -> dict[str, Any]:
    """Seconds of one eigensolve or CP-ALS (20 sweeps per phase) at ``threads``, with the thread
    policy of decomp.factorize.linalg on or off."""
    from decomp.factorize import linalg

    torch.set_num_threads(threads)
    if not policy:
        linalg.SOLVER_THREADS = None
    call = _thread_op(kind, size)
    start = time.perf_counter()
    call()
    return {"seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- the comparison


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["model"], row["layer"], row["spec"]


def compare_case(case: dict[str, Any], index: int, timeout: float) -> dict[str, Any]:
    """Both solvers on one case, back to back, the first alternating with ``index``."""
    row = {k: case[k] for k in ("model", "layer", "shape", "spec", "rank")}
    if case["rank"] < 1:
        return {**row, "status": "skipped", "note": f"{case['spec']} gives rank 0"}
    order = ("decomp", "tensorly") if index % 2 == 0 else ("tensorly", "decomp")
    row["first"] = order[0]
    row["load_before"] = [round(x, 2) for x in os.getloadavg()]
    for solver in order:
        result = run_isolated(
            task_solve, timeout, solver=solver, weight=case["weight"], rank=case["rank"], threads=1
        )
        if result.status != "ok":
            row[f"{solver}_note"] = (result.error or result.status).strip().splitlines()[-1]
            continue
        row[f"{solver}_s"] = result.value["seconds"]
        row[f"{solver}_err"] = result.value["error"]
        row[f"{solver}_peak_mb"] = result.memory["solve"]["peak_delta_mb"]
        if solver == "decomp":
            row["decomp_sweeps"] = result.value["sweeps"]
    row["load_after"] = [round(x, 2) for x in os.getloadavg()]
    both = "decomp_err" in row and "tensorly_err" in row
    row["status"] = "ok" if both else "error"
    if both:
        row["speedup"] = ratio(row["tensorly_s"], row["decomp_s"])
        row["err_gap"] = row["decomp_err"] - row["tensorly_err"]
        row["err_gap_rel"] = ratio(row["err_gap"], row["tensorly_err"])
    return row


def summarize(
    rows: Sequence[dict[str, Any]], models: Sequence[str], specs: Sequence[str]
) -> list[dict[str, Any]]:
    """Per model and spec, per model, and overall: time totals, speed-up, error verdicts."""
    groups: list[tuple[str, str, list[dict[str, Any]]]] = []
    ok = [r for r in rows if r["status"] == "ok"]
    for model in models:
        for spec in specs:
            groups.append(
                (model, spec, [r for r in ok if r["model"] == model and r["spec"] == spec])
            )
        groups.append((model, "all", [r for r in ok if r["model"] == model]))
    groups.append(("all", "all", ok))
    out = []
    for model, spec, group in groups:
        total = [r for r in rows if (model == "all" or r["model"] == model)]
        total = [r for r in total if spec == "all" or r["spec"] == spec]
        summary: dict[str, Any] = {
            "model": model,
            "spec": spec,
            "n_layers": len(group),
            "n_skipped": sum(r["status"] == "skipped" for r in total),
            "n_failed": sum(r["status"] == "error" for r in total),
        }
        if group:
            d_s, t_s = sum(r["decomp_s"] for r in group), sum(r["tensorly_s"] for r in group)
            d_err = statistics.fmean(r["decomp_err"] for r in group)
            t_err = statistics.fmean(r["tensorly_err"] for r in group)
            summary |= {
                "decomp_s": d_s,
                "tensorly_s": t_s,
                "speedup": ratio(t_s, d_s),
                "decomp_mean_err": d_err,
                "tensorly_mean_err": t_err,
                "mean_err_gap_rel": ratio(d_err - t_err, t_err),
                "worst_err_gap_rel": max(r["err_gap_rel"] for r in group),
                "worst_layer": max(group, key=lambda r: r["err_gap_rel"])["layer"],
                "decomp_peak_mb": max(r["decomp_peak_mb"] for r in group),
                "tensorly_peak_mb": max(r["tensorly_peak_mb"] for r in group),
            }
            summary["meets_target"] = (
                summary["speedup"] >= TARGET_SPEEDUP
                and summary["mean_err_gap_rel"] <= MEAN_SLACK
                and summary["worst_err_gap_rel"] <= LAYER_SLACK
            )
        out.append(summary)
    return out


# --------------------------------------------------------------------------- memory, CLI


def measure_memory(timeout: float) -> dict[str, Any]:
    """Peak memory and time of CP over resnet18 in a child, at torch's default threads."""
    result = run_isolated(task_decompose, timeout, model="resnet18", threads=None)
    row: dict[str, Any] = {"model": "resnet18", "rank": "ratio:0.3", "status": result.status}
    if result.status == "ok":
        mem = result.memory["decompose"]
        row |= {
            "decompose_s": result.value["seconds"],
            "n_factorized": result.value["n_factorized"],
            "peak_delta_mb": mem["peak_delta_mb"],
            "hwm_reset": mem["hwm_reset"],
            "torch_threads": result.value["threads"],
        }
        row["under_limit"] = row["peak_delta_mb"] < MEMORY_LIMIT_MB
    else:
        row["note"] = (result.error or "").strip().splitlines()[-1:]
    return row


def measure_cli(timeout: float) -> dict[str, Any]:
    """Wall time of the ``decompose`` command on a saved resnet18 state_dict (64 x 64, CP 0.3)."""
    exe = shutil.which("decompose", path=str(Path(sys.executable).parent)) or "decompose"
    size = ",".join(str(s) for s in INPUT_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        sd = Path(tmp) / "resnet18.pt"
        torch.save(build_model("resnet18").state_dict(), sd)
        command = [exe, str(sd), "--arch", "torchvision.models:resnet18", "--method", "cp"]
        command += ["--rank", "ratio:0.3", "--input-size", size, "-o", str(Path(tmp) / "out.pt")]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
    shown = ["decompose", "resnet18.pt", *command[2:-1], "out.pt"]
    row = {"command": " ".join(shown), "seconds": seconds, "returncode": done.returncode}
    row["load"] = [round(x, 2) for x in os.getloadavg()]
    row["under_limit"] = done.returncode == 0 and seconds < CLI_LIMIT_S
    if done.returncode:
        row["note"] = (done.stderr or done.stdout).strip().splitlines()[-1:]
    return row


# --------------------------------------------------------------------------- threads


THREAD_SIZES = {"eigh": (256, 1024, 2048, 4096), "cp_als": (64, 256, 512)}
QUICK_THREAD_SIZES = {"eigh": (256, 1024), "cp_als": (64, 256)}
SETTINGS = ((1, False), (2, False), (2, True))
"""(torch threads, policy on) per measurement."""


def _competitor() -> subprocess.Popen:
    """One CPU-bound process (a busy loop), the 'loaded' condition."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure_threads(sizes: dict[str, Sequence[int]], rounds: int, timeout: float) -> list[dict]:
    """Seconds per (op, size, threads, policy), idle and loaded; the fastest of ``rounds``."""
    times: dict[tuple[str, int, str, int, bool], list[float]] = {}
    loads: dict[str, list[float]] = {"idle": [], "loaded": []}
    for _ in range(rounds):
        for condition in ("idle", "loaded"):
            competitor = _competitor() if condition == "loaded" else None
            try:
                time.sleep(0.5)
                for kind, ns in sizes.items():
                    for n in ns:
                        for threads, policy in SETTINGS:
                            kwargs = {"kind": kind, "size": n, "threads": threads, "policy": policy}
                            result = run_isolated(task_threads, timeout, **kwargs)
                            seconds = result.value["seconds"] if result.status == "ok" else None
                            key = (kind, n, condition, threads, policy)
                            times.setdefault(key, []).append(seconds)
                loads[condition].append(os.getloadavg()[0])
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    rows = []
    for kind, ns in sizes.items():
        for n in ns:
            row: dict[str, Any] = {"op": kind, "size": n}
            for condition in ("idle", "loaded"):
                for threads, policy in SETTINGS:
                    found = [t for t in times[(kind, n, condition, threads, policy)] if t]
                    label = f"{condition}_t{threads}" + ("_policy" if policy else "")
                    row[f"{label}_s"] = min(found) if found else None
                row[f"{condition}_t2_over_t1"] = ratio(
                    row[f"{condition}_t2_s"], row[f"{condition}_t1_s"]
                )
                row[f"{condition}_load"] = round(statistics.fmean(loads[condition]), 2)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


LAYER_COLUMNS = [
    Column("model"),
    Column("layer"),
    Column("shape"),
    Column("spec"),
    Column("rank", "R", "d"),
    Column("decomp_s", "decomp s", ".2f"),
    Column("tensorly_s", "tensorly s", ".1f"),
    Column("speedup", "speed-up", ".0f"),
    Column("decomp_err", "decomp err", ".5f"),
    Column("tensorly_err", "tensorly err", ".5f"),
    Column("err_gap_rel", "err gap (rel.)", "+.2%"),
    Column("decomp_sweeps", "sweeps", "d"),
    Column("decomp_peak_mb", "decomp +MiB", ".0f"),
    Column("tensorly_peak_mb", "tensorly +MiB", ".0f"),
    Column("load_before", "load"),
    Column("status"),
    Column("note"),
]
SUMMARY_COLUMNS = [
    Column("model"),
    Column("spec"),
    Column("n_layers", "layers", "d"),
    Column("n_skipped", "skipped (rank 0)", "d"),
    Column("n_failed", "failed", "d"),
    Column("decomp_s", "decomp s", ".1f"),
    Column("tensorly_s", "tensorly s", ".0f"),
    Column("speedup", "speed-up", ".0f"),
    Column("decomp_mean_err", "decomp mean err", ".5f"),
    Column("tensorly_mean_err", "tensorly mean err", ".5f"),
    Column("mean_err_gap_rel", "mean gap (rel.)", "+.3%"),
    Column("worst_err_gap_rel", "worst layer gap (rel.)", "+.3%"),
    Column("decomp_peak_mb", "decomp peak +MiB", ".0f"),
    Column("tensorly_peak_mb", "tensorly peak +MiB", ".0f"),
    Column("meets_target", "target met"),
]
MEMORY_COLUMNS = [
    Column("model"),
    Column("rank"),
    Column("status"),
    Column("n_factorized", "layers", "d"),
    Column("decompose_s", "decompose s", ".1f"),
    Column("peak_delta_mb", "peak +MiB", ".0f"),
    Column("under_limit", f"< {MEMORY_LIMIT_MB:g} MiB"),
]
CLI_COLUMNS = [
    Column("command"),
    Column("seconds", "s", ".1f"),
    Column("returncode", "exit", "d"),
    Column("load"),
    Column("under_limit", f"< {CLI_LIMIT_S:g} s"),
]


def _thread_columns() -> list[Column]:
    cols = [Column("op"), Column("size", "size", "d")]
    for condition in ("idle", "loaded"):
        for threads, policy in SETTINGS:
            label = f"{condition}_t{threads}" + ("_policy" if policy else "")
            head = f"{condition}, {threads} thr" + (" + policy" if policy else "")
            cols.append(Column(f"{label}_s", f"{head} s", ".3f"))
        cols.append(Column(f"{condition}_t2_over_t1", f"{condition} 2/1", ".1f"))
        cols.append(Column(f"{condition}_load", f"{condition} load", ".1f"))
    return cols


def verdict_line(result: Mapping[str, Any]) -> str:
    """The overall verdict: speed-up against tensorly, mean and worst-layer error gaps, target."""
    overall = next((s for s in result.get("summary") or [] if s["model"] == "all"), {})
    if not overall.get("n_layers"):
        return "Overall: no layer compared yet."
    quick = (result.get("meta") or {}).get("config", {}).get("quick")
    return (
        f"Overall: decomp {_fmt(overall.get('speedup'), '.0f')}x faster than tensorly's parafac "
        f"over {overall.get('n_layers', 0)} layers; mean error gap "
        f"{_fmt(overall.get('mean_err_gap_rel'), '+.3%')} (allowed +{MEAN_SLACK:.1%}), worst "
        f"layer {_fmt(overall.get('worst_err_gap_rel'), '+.3%')} (allowed +{LAYER_SLACK:.0%}); "
        f"target {TARGET_SPEEDUP:g}x: {'met' if overall.get('meets_target') else 'NOT met'}"
        + (" (the target is the full run's; --quick has small layers only)." if quick else ".")
    )


def _met(ok: Any) -> str:
    return "met" if ok else "NOT met"


def limits_line(result: Mapping[str, Any]) -> str:
    """Peak memory of CP over resnet18 and the ``decompose`` command's time, against the limits."""
    memory, cli = result.get("memory"), result.get("cli")
    if not memory:
        text = "Memory: CP over resnet18 not measured yet"
    elif memory.get("status") != "ok":
        text = f"Memory: CP over resnet18 {memory.get('status')}"
    else:
        text = (
            f"Memory: CP over resnet18 ({memory.get('rank')}, {memory.get('n_factorized')} "
            f"layers, {_fmt(memory.get('decompose_s'), '.1f')} s) adds "
            f"{_fmt(memory.get('peak_delta_mb'), '.0f')} MiB at peak; limit < "
            f"{MEMORY_LIMIT_MB:g} MiB: {_met(memory.get('under_limit'))}"
        )
    if not cli:
        return text + ". The `decompose` command: not timed yet."
    return (
        f"{text}. The `decompose` command (resnet18, CP ratio:0.3): "
        f"{_fmt(cli.get('seconds'), '.1f')} s, exit {cli.get('returncode')}; limit < "
        f"{CLI_LIMIT_S:g} s: {_met(cli.get('under_limit'))}."
    )


def render_markdown(result: dict[str, Any]) -> str:
    """The report, rendered from a results dict (as read back from the JSON)."""
    parts = [
        "# CP-ALS: decomp vs tensorly's parafac",
        "",
        "Generated by `python -m benchmarks.bench_cp` from `cp_speed*.json`; do not edit by hand.",
        "",
        render_meta(result["meta"]),
        verdict_line(result),
        "",
        limits_line(result),
        "",
        "## Summary",
        "",
        render_table(result["summary"], SUMMARY_COLUMNS),
        "## Memory: CP over resnet18 (child process)",
        "",
        render_table([result["memory"]] if result.get("memory") else [], MEMORY_COLUMNS),
        "## The command line",
        "",
        render_table([result["cli"]] if result.get("cli") else [], CLI_COLUMNS),
        "## Thread policy: the thread trap, idle and loaded",
        "",
        render_table(result.get("threads") or [], _thread_columns()),
        "## Per layer",
        "",
        render_table(result["rows"], LAYER_COLUMNS),
        "## Notes",
        "",
        *[f"- {note}" for note in result.get("notes", [])],
        "",
    ]
    return "\n".join(parts)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


NOTES = [
    "Random weights (seed 0). Ranks: decomp.plan.select_ranks for the CP method: ratio:0.3 is "
    "0.3 x the larger channel count, vbmf the larger of the two channel unfoldings' EVBMF ranks "
    "(0 when either is 0: random kernels look like noise to EVBMF, and those rows are skipped).",
    "Each solve runs in its own child process on one torch thread (tensorly's best case here: "
    "two threads fall into the thread trap on this machine); decomp and tensorly alternate "
    "which goes first. tensorly: parafac(init='svd', n_iter_max=100, tol=1e-8), its defaults; "
    "decomp: cp_factors defaults (at most 100 sweeps on the compressed core and 100 on the full "
    "kernel, tol 1e-6 on the change of relative error).",
    "err gap (rel.) = (decomp err - tensorly err) / tensorly err; negative is better. Peak "
    "+MiB: VmHWM rise above the RSS at the start of the call (benchmarks/common.py).",
    "Thread policy: 'idle' is the machine as other users left it (see the load column), "
    "'loaded' adds one busy-loop process started by this script. eigh: torch.linalg.eigh of an "
    "n x n float64 Gram; cp_als: cp_factors at rank 0.3 x n on an n x n x 3 x 3 random kernel, "
    "20 sweeps per phase. '+ policy' is decomp's default (linalg.solver_threads); without it the "
    "threads are forced to the column's count.",
    "Times on a shared machine: compare the ratios within this run, not absolute seconds.",
]


# --------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18's small layers only")
    parser.add_argument("--models", nargs="+", default=None, choices=[*MODELS, *TRAINED])
    parser.add_argument("--specs", nargs="+", default=None, help=f"default: {' '.join(SPECS)}")
    parser.add_argument("--fresh", action="store_true", help="ignore rows of an earlier run")
    parser.add_argument("--skip-threads", action="store_true", help="no thread-policy section")
    parser.add_argument("--timeout", type=float, default=3600.0, help="s per child process")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the comparison; write ``cp_speed[_quick].json`` and ``.md``."""
    from rich.console import Console

    args = parse_args(argv)
    console = Console(stderr=True)
    models = list(args.models or (("resnet18",) if args.quick else MODELS))
    specs = list(args.specs or SPECS)
    json_path = args.output / ("cp_speed_quick.json" if args.quick else "cp_speed.json")
    config = {
        "models": models,
        "specs": specs,
        "quick": args.quick,
        "input_size": list(INPUT_SIZE),
        "threads": 1,
        "target_speedup": TARGET_SPEEDUP,
        "mean_slack": MEAN_SLACK,
        "layer_slack": LAYER_SLACK,
    }
    previous = read_results(json_path) if json_path.exists() and not args.fresh else {}
    wanted = cases(models, specs, args.quick)
    keys = {_key(c) for c in wanted}
    # rows of an earlier run are kept (those of other models and specs too), failed ones redone
    done = {_key(r): r for r in previous.get("rows", []) if r["status"] != "error"}
    sections = {k: previous.get(k) for k in ("memory", "cli", "threads")}

    def save() -> dict[str, Any]:
        rows = [done[_key(c)] for c in wanted if _key(c) in done]
        rows += [r for k, r in done.items() if k not in keys]
        meta = make_meta(config, resumed_rows=len(previous.get("rows", [])))
        seen = list(dict.fromkeys(r["model"] for r in rows))
        summary = summarize(rows, seen, list(dict.fromkeys(r["spec"] for r in rows)))
        return write_results(json_path, meta, rows, summary=summary, notes=NOTES, **sections)

    for index, case in enumerate(wanted):
        if _key(case) in done:
            continue
        console.print(
            f"{case['model']} {case['layer']} {case['shape']} {case['spec']} R={case['rank']}"
        )
        row = compare_case(case, index, args.timeout)
        row["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        done[_key(case)] = row
        console.print(
            f"  decomp {_fmt(row.get('decomp_s'), '.2f')} s, tensorly "
            f"{_fmt(row.get('tensorly_s'), '.1f')} s, gap {_fmt(row.get('err_gap_rel'), '+.3%')}"
        )
        save()
    if sections["memory"] is None or args.fresh:
        console.print("memory: CP over resnet18")
        sections["memory"] = measure_memory(args.timeout)
        save()
    if sections["cli"] is None or args.fresh:
        console.print("the decompose command")
        sections["cli"] = measure_cli(args.timeout)
        save()
    if not args.skip_threads and (sections["threads"] is None or args.fresh):
        console.print("thread policy")
        sizes = QUICK_THREAD_SIZES if args.quick else THREAD_SIZES
        sections["threads"] = measure_threads(sizes, 1 if args.quick else 2, args.timeout)
    result = save()
    write_text(json_path.with_suffix(".md"), render_markdown(read_results(json_path)))
    console.print(verdict_line(result))
    console.print(limits_line(result))
    console.print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
