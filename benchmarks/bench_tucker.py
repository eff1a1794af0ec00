"""Tucker-2 at equal ranks: decomp vs tensorly vs tensorly-torch, with the HOSVD floor.

The sixteen 3x3 convs of torchvision's ResNet-50 (random init, ``torch.manual_seed(0)``, no
download) are decomposed at half ranks, ``(r_out, r_in) = (Cout // 2, Cin // 2)``, by

- ``decomp``: :func:`decomp.factorize.tucker.tucker2_factors` (HOOI on the Gram matrices);
- ``tensorly``: ``partial_tucker`` over modes (0, 1) through :mod:`decomp._tensorly`;
- ``tltorch``: ``tltorch.FactorizedConv.from_conv(conv, rank=(r_out, r_in, kh, kw),
  factorization='tucker', implementation='factorized', decompose_weights=True)``. A tuple rank
  passes through ``tensorly.tucker_tensor.validate_tucker_rank`` unchanged, and full ranks on the
  spatial modes make its 4-mode Tucker the same model as Tucker-2 (the spatial factors are
  orthogonal kh x kh and kw x kw matrices). Its time includes building the module, as a user pays.
- ``floor``: the two Gram eigendecompositions of the channel unfoldings (HOSVD) and nothing else;
  no HOOI starting from HOSVD can be faster. Its error (``hosvd_err``) is plain HOSVD's.

Each method keeps its library's defaults for iterations and tolerance. Calls are interleaved
layer by layer and repeated; a layer's time is its fastest repeat. Errors are
``||W - W_hat||_F / ||W||_F`` in float64. Nothing is asserted: the JSON reports
``speedup_vs_tensorly``, ``speedup_vs_tltorch`` and ``error_no_worse`` (every layer's decomp
error <= tensorly's + 1e-6).

Usage (from the repository root)::

    python -m benchmarks.bench_tucker            # writes benchmarks/results/tucker_speed.{json,md}
    python -m benchmarks.bench_tucker --tiny     # a few small shapes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    Column,
    make_meta,
    ratio,
    read_results,
    render_meta,
    render_table,
    timed,
    write_results,
    write_text,
)

METHODS = ("decomp", "tensorly", "tltorch", "floor")
Rebuild = Callable[[], Tensor]
"""A solver returns a function that rebuilds the full kernel (called outside the timing)."""
ERROR_SLACK = 1e-6
TARGET_SPEEDUP = 5.0


@dataclass
class Case:
    """One layer to decompose: its qualified name, the conv, and the Tucker-2 ranks."""

    name: str
    conv: nn.Conv2d
    ranks: tuple[int, int]


# --------------------------------------------------------------------------- the layers


def resnet50_cases() -> list[Case]:
    """The sixteen 3x3 convs of a randomly initialised torchvision ResNet-50, at half ranks."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    return half_rank_cases(model, kernel_size=(3, 3))


def half_rank_cases(model: nn.Module, kernel_size: tuple[int, int] | None = None) -> list[Case]:
    """Every ungrouped conv of ``model`` with a kernel larger than 1x1, at ``(Cout//2, Cin//2)``."""
    cases = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            continue
        if module.kernel_size == (1, 1) or (kernel_size and module.kernel_size != kernel_size):
            continue
        ranks = (max(1, module.out_channels // 2), max(1, module.in_channels // 2))
        cases.append(Case(name, module, ranks))
    return cases


def tiny_cases() -> list[Case]:
    """A few small convs (seeded) for a run of seconds."""
    torch.manual_seed(0)
    shapes = [(16, 16, 1), (32, 16, 2), (32, 32, 1), (48, 32, 1)]
    convs = [nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False) for cout, cin, s in shapes]
    return [
        Case(f"tiny.{i}", c, (c.out_channels // 2, c.in_channels // 2)) for i, c in enumerate(convs)
    ]


# --------------------------------------------------------------------------- the methods


@dataclass(frozen=True)
class Settings:
    """Solver settings; None keeps each library's default."""

    n_iter_max: int | None = None
    """Most HOOI sweeps, for every method."""
    decomp_tol: float | None = None
    """decomp's ``tol`` (on the kept energy, relative to ||W||^2)."""

    def iters(self) -> dict[str, int]:
        return {} if self.n_iter_max is None else {"n_iter_max": self.n_iter_max}


def _decomp(conv: nn.Conv2d, ranks: tuple[int, int], settings: Settings) -> Rebuild:
    from decomp.factorize.tucker import tucker2_factors

    kwargs: dict[str, Any] = settings.iters()
    if settings.decomp_tol is not None:
        kwargs["tol"] = settings.decomp_tol
    factors = tucker2_factors(conv.weight.detach(), ranks, **kwargs)
    return factors.reconstruct


def _tensorly(conv: nn.Conv2d, ranks: tuple[int, int], settings: Settings) -> Rebuild:
    from decomp._tensorly import partial_tucker

    w = conv.weight.detach()
    core, (u_out, u_in) = partial_tucker(w, list(ranks), modes=[0, 1], **settings.iters())
    # two-operand contractions: torch.einsum does not reorder and would build (o, r, i, s)
    return lambda: torch.einsum("is,oshw->oihw", u_in, torch.einsum("or,rshw->oshw", u_out, core))


def _tltorch(conv: nn.Conv2d, ranks: tuple[int, int], settings: Settings) -> Rebuild:
    import tltorch

    rank = (*ranks, *conv.kernel_size)  # full spatial modes = Tucker-2
    layer = tltorch.FactorizedConv.from_conv(
        conv,
        rank=rank,
        factorization="tucker",
        implementation="factorized",
        decompose_weights=True,
        decomposition_kwargs=settings.iters(),
    )
    if tuple(layer.weight.rank) != rank:
        raise RuntimeError(f"tltorch changed the rank {rank} to {layer.weight.rank}")
    return lambda: layer.weight.to_tensor().detach()


def _top_eigvecs(matrix: Tensor, rank: int) -> Tensor:
    """Leading ``rank`` eigenvectors of a PSD matrix (float64 eigh, as decomp does)."""
    return torch.linalg.eigh(matrix.double())[1][:, -rank:]


def _floor(conv: nn.Conv2d, ranks: tuple[int, int], settings: Settings) -> Rebuild:
    w = conv.weight.detach().float()
    unfold_out = w.reshape(w.shape[0], -1)
    unfold_in = w.transpose(0, 1).reshape(w.shape[1], -1)
    u_out = _top_eigvecs(unfold_out @ unfold_out.T, ranks[0])
    u_in = _top_eigvecs(unfold_in @ unfold_in.T, ranks[1])

    def hosvd() -> Tensor:
        c_out, c_in, kh, kw = w.shape
        x = (u_out @ (u_out.T @ w.double().reshape(c_out, -1))).reshape(c_out, c_in, kh * kw)
        return (u_in @ u_in.T @ x).reshape(c_out, c_in, kh, kw)  # broadcast over Cout

    return hosvd


SOLVERS: dict[str, Callable[[nn.Conv2d, tuple[int, int], Settings], Rebuild]] = {
    "decomp": _decomp,
    "tensorly": _tensorly,
    "tltorch": _tltorch,
    "floor": _floor,
}


def relative_error(weight: Tensor, approx: Tensor) -> float:
    """``||W - W_hat||_F / ||W||_F`` in float64."""
    w = weight.detach().double()
    return float((w - approx.detach().double()).norm() / w.norm())


def _warm_up(methods: Sequence[str]) -> None:
    """One untimed call per method on a small kernel (LAPACK and import start-up costs)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, bias=False)
    for method in methods:
        SOLVERS[method](conv, (4, 4), Settings(n_iter_max=2))()


# --------------------------------------------------------------------------- the comparison


def compare_tucker(
    cases: Sequence[Case],
    repeats: int = 1,
    methods: Sequence[str] = METHODS,
    progress: Callable[[str], None] | None = None,
    settings: Settings = Settings(),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time every method on every case, interleaved, and measure its reconstruction error.

    Args:
        cases: the layers and ranks.
        repeats: passes over all layers; a layer's time is the fastest of its passes.
        methods: names from :data:`SOLVERS`; ``decomp`` must be among them.
        progress: called with a short label after each layer-method call.
        settings: iterations and decomp's tolerance (default: each library's own).

    Returns:
        ``(rows, summary)``: one wide row per layer (``<method>_s``, ``<method>_err`` ...), and the
        totals, mean errors and speed-ups.
    """
    unknown = sorted(set(methods) - set(SOLVERS))
    if unknown or "decomp" not in methods:
        raise ValueError(f"methods must include 'decomp' and be among {sorted(SOLVERS)}")
    _warm_up(methods)
    times: dict[tuple[int, str], list[float]] = {}
    errors: dict[tuple[int, str], float] = {}
    for _ in range(repeats):
        for index, case in enumerate(cases):
            for method in methods:
                solve = SOLVERS[method]
                seconds, rebuild = timed(lambda s=solve, c=case: s(c.conv, c.ranks, settings))
                times.setdefault((index, method), []).append(seconds)
                errors[(index, method)] = relative_error(case.conv.weight, rebuild())
                if progress:
                    progress(f"{case.name} {method}")
    rows = [_layer_row(i, case, methods, times, errors) for i, case in enumerate(cases)]
    return rows, summarize(rows, methods)


def _layer_row(
    index: int,
    case: Case,
    methods: Sequence[str],
    times: dict[tuple[int, str], list[float]],
    errors: dict[tuple[int, str], float],
) -> dict[str, Any]:
    """One layer's times (fastest and median repeat) and errors, keyed by method."""
    conv = case.conv
    row: dict[str, Any] = {
        "layer": case.name,
        "shape": list(conv.weight.shape),
        "ranks": list(case.ranks),
        "stride": list(conv.stride),
    }
    for method in methods:
        row[f"{method}_s"] = min(times[(index, method)])
        row[f"{method}_median_s"] = statistics.median(times[(index, method)])
        row[f"{'hosvd' if method == 'floor' else method}_err"] = errors[(index, method)]
    if "tensorly" in methods:
        row["err_gap_vs_tensorly"] = row["decomp_err"] - row["tensorly_err"]
    return row


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Totals per method, mean errors, and decomp's speed-ups and error verdicts."""
    per_method = []
    for method in methods:
        err_key = "hosvd_err" if method == "floor" else f"{method}_err"
        errs = [r[err_key] for r in rows]
        per_method.append(
            {
                "method": method,
                "total_s": sum(r[f"{method}_s"] for r in rows),
                "total_median_s": sum(r[f"{method}_median_s"] for r in rows),
                "mean_rel_error": statistics.fmean(errs),
                "max_rel_error": max(errs),
            }
        )
    totals = {m["method"]: m["total_s"] for m in per_method}
    for m in per_method:
        m["time_vs_decomp"] = ratio(m["total_s"], totals["decomp"])
    summary: dict[str, Any] = {
        "methods": per_method,
        "n_layers": len(rows),
        "speedup_vs_tensorly": ratio(totals.get("tensorly"), totals["decomp"]),
        "speedup_vs_tltorch": ratio(totals.get("tltorch"), totals["decomp"]),
        "decomp_vs_floor": ratio(totals["decomp"], totals.get("floor")),
        "target_speedup": TARGET_SPEEDUP,
        "error_slack": ERROR_SLACK,
    }
    for other in ("tensorly", "tltorch"):
        if other in methods:
            gaps = [r["decomp_err"] - r[f"{other}_err"] for r in rows]
            suffix = "" if other == "tensorly" else "_vs_tltorch"
            summary[f"error_no_worse{suffix}"] = all(g <= ERROR_SLACK for g in gaps)
            summary[f"max_error_gap_vs_{other}"] = max(gaps)
    speedups = [summary["speedup_vs_tensorly"], summary["speedup_vs_tltorch"]]
    summary["meets_target"] = (
        all(s is not None and s >= TARGET_SPEEDUP for s in speedups)
        and summary.get("error_no_worse") is True
    )
    return summary


# --------------------------------------------------------------------------- report


LAYER_COLUMNS = [
    Column("layer"),
    Column("shape"),
    Column("ranks"),
    Column("decomp_s", "decomp s", ".3f"),
    Column("tensorly_s", "tensorly s", ".3f"),
    Column("tltorch_s", "tltorch s", ".3f"),
    Column("floor_s", "floor s", ".3f"),
    Column("decomp_err", "decomp err", ".5f"),
    Column("tensorly_err", "tensorly err", ".5f"),
    Column("tltorch_err", "tltorch err", ".5f"),
    Column("hosvd_err", "HOSVD err", ".5f"),
    Column("err_gap_vs_tensorly", "decomp - tensorly", ".1e"),
]
METHOD_COLUMNS = [
    Column("method"),
    Column("total_s", "total s (fastest repeat)", ".3f"),
    Column("total_median_s", "total s (median repeat)", ".3f"),
    Column("time_vs_decomp", "time / decomp", ".2f"),
    Column("mean_rel_error", "mean rel. error", ".5f"),
    Column("max_rel_error", "max rel. error", ".5f"),
]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def verdict_line(s: dict[str, Any]) -> str:
    """The one-sentence verdict of a ``summary`` block: speed-ups, error check, target met."""
    return (
        f"decomp is {_fmt(s['speedup_vs_tensorly'], '.2f')}x faster than tensorly and "
        f"{_fmt(s['speedup_vs_tltorch'], '.2f')}x faster than tltorch over {s['n_layers']} layers, "
        f"{_fmt(s['decomp_vs_floor'], '.2f')}x the HOSVD floor; per-layer error no worse than "
        f"tensorly's (+{s['error_slack']:g}): {s.get('error_no_worse')}; largest gap "
        f"{_fmt(s.get('max_error_gap_vs_tensorly'), '.2e')}. Target {s['target_speedup']:g}x "
        f"with no worse error: {'met' if s['meets_target'] else 'NOT met'}."
    )


def render_markdown(result: dict[str, Any]) -> str:
    """The report, rendered from a results dict (as read back from the JSON)."""
    s = result["summary"]
    return "\n".join(
        [
            "# Tucker-2 at equal ranks: decomp vs tensorly vs tensorly-torch",
            "",
            "Generated by `python -m benchmarks.bench_tucker` from `tucker_speed*.json`; "
            "do not edit by hand.",
            "",
            render_meta(result["meta"]),
            verdict_line(s),
            "",
            "## Totals",
            "",
            render_table(s["methods"], METHOD_COLUMNS),
            "## Per layer (fastest repeat)",
            "",
            render_table(result["rows"], LAYER_COLUMNS),
            "## Notes",
            "",
            *[f"- {note}" for note in result.get("notes", [])],
            "",
        ]
    )


NOTES = [
    "Relative error = ||W - W_hat||_F / ||W||_F in float64; ranks (Cout//2, Cin//2).",
    "tltorch gets rank (r_out, r_in, kh, kw): full spatial modes, so its 4-mode Tucker is a "
    "Tucker-2; its time includes building the FactorizedConv module.",
    "floor = Gram + float64 eigh of the two channel unfoldings only (HOSVD); its error column is "
    "plain HOSVD's.",
    "Defaults unless the config says otherwise: decomp n_iter_max=100, tol=5e-5 (on the kept "
    "energy); tensorly and "
    "tltorch n_iter_max=100, tol=1e-4 (on the relative error), init='svd'.",
    "Importing tltorch sets tensorly's global backend to pytorch; decomp._tensorly runs inside "
    "tl.backend_context('pytorch') either way.",
    "Times on a shared machine: compare the ratios within this run, not absolute seconds.",
]


# --------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few small shapes (seconds)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--repeats", type=int, default=None, help="passes (default 3; tiny 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; tiny 1)"
    )
    parser.add_argument(
        "--n-iter-max",
        type=int,
        default=None,
        help="HOOI sweeps for all (default: library's; tiny 10)",
    )
    parser.add_argument(
        "--decomp-tol", type=float, default=None, help="decomp's tol (default: decomp's own)"
    )
    return parser.parse_args(argv)


def _config(args: argparse.Namespace, repeats: int, settings: Settings) -> dict[str, Any]:
    default = "library defaults"
    return {
        "layers": "tiny" if args.tiny else "resnet50 3x3 convs (random init, seed 0)",
        "rank_rule": "(Cout//2, Cin//2)",
        "repeats": repeats,
        "n_iter_max": default if settings.n_iter_max is None else settings.n_iter_max,
        "decomp_tol": "decomp default" if settings.decomp_tol is None else settings.decomp_tol,
        "methods": list(METHODS),
        "dtype": "float32",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, write ``tucker_speed[_tiny].json`` and ``.md`` into ``--output``."""
    from rich.console import Console
    from rich.progress import Progress

    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    repeats = args.repeats or (1 if args.tiny else 3)
    settings = Settings(args.n_iter_max or (10 if args.tiny else None), args.decomp_tol)
    import tensorly as tl

    backend_before = tl.get_backend()
    cases = tiny_cases() if args.tiny else resnet50_cases()
    console = Console(stderr=True)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("tucker-2", total=len(cases) * len(METHODS) * repeats)
            rows, summary = compare_tucker(
                cases,
                repeats,
                progress=lambda label: bar.update(task, advance=1, description=label),
                settings=settings,
            )
        backend_after = tl.get_backend()
        meta = make_meta(
            _config(args, repeats, settings),
            tensorly_backend={"before": backend_before, "after": backend_after},
        )
    finally:
        tl.set_backend(backend_before)  # undo tltorch's import-time set_backend('pytorch')
        torch.set_num_threads(threads_before)
    stem = "tucker_speed_tiny" if args.tiny else "tucker_speed"
    json_path = args.output / f"{stem}.json"
    write_results(json_path, meta, rows, summary=summary, notes=NOTES)
    write_text(args.output / f"{stem}.md", render_markdown(read_results(json_path)))
    console.print(
        f"speed-up vs tensorly {summary['speedup_vs_tensorly']:.2f}x, vs tltorch "
        f"{summary['speedup_vs_tltorch']:.2f}x; error no worse: {summary['error_no_worse']}; "
        f"wrote {json_path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
