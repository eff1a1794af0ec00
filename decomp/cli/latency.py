"""``decomp profile``: measure a model's per-layer latency table; the latency options that
``decompose --target-latency`` shares with it."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from decomp import checkpoint
from decomp._utils import parse_input_size
from decomp.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    InputSizeOpt,
    JsonOpt,
    ModelArg,
    TrustPickleOpt,
    VerboseOpt,
    command,
    forward_hint,
    input_size_of,
    load_model,
    method_option,
    out,
    print_json,
    status,
)
from decomp.factorize.registry import AUTO
from decomp.latency import LatencyTable, layer_signature, profile

TABLE_DIR = Path("runs") / "latency"
"""Where latency tables go by default (relative to the current folder)."""


class Runtime(StrEnum):
    torch = "torch"
    onnxruntime = "onnxruntime"


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


RuntimeOpt = Annotated[
    Runtime,
    typer.Option("--runtime", help="What runs the model: eager PyTorch or ONNX Runtime."),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where latency is measured.")]
BatchOpt = Annotated[int, typer.Option("--batch", min=1, help="Images per call when timing.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="Intra-op threads when timing. Default: torch's."),
]
TableOpt = Annotated[
    Path | None,
    typer.Option(
        "--latency-table",
        metavar="FILE",
        help="Latency table JSON to reuse and extend. Default: "
        "runs/latency/RUNTIME-DEVICE-bBATCH-tTHREADS.json in the current folder.",
        show_default=False,
    ),
]


def table_path(
    given: Path | None, runtime: str, device: str, batch: int, threads: int | None
) -> Path:
    """``given``, else the default file for the setting (one file per key)."""
    if given is not None:
        return given
    count = threads or torch.get_num_threads()
    return TABLE_DIR / f"{runtime}-{device}-b{batch}-t{count}.json"


def profile_command(
    model: ModelArg,
    runtime: RuntimeOpt = Runtime.torch,
    device: DeviceOpt = Device.cpu,
    batch: BatchOpt = 1,
    threads: ThreadsOpt = None,
    method: Annotated[str, method_option("The method whose ranks are timed.")] = AUTO,
    input_size: InputSizeOpt = None,
    table: TableOpt = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="GLOB", help="Leave matching layers out (repeatable)."),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Time each eligible layer dense and factorized at a few ranks, for --target-latency.

    The latency table it writes is what decompose --target-latency --latency-table reuses.
    """
    with command(verbose):
        size = parse_input_size(input_size)
        checkpoint.check_input_path(model)
        net = load_model(model, arch, arch_kwargs, trust_pickle)
        size = input_size_of(size, net, model)
        path = table_path(table, runtime.value, device.value, batch, threads)
        with status(f"timing layers ({runtime.value}, {device.value}, batch {batch})"):
            result = forward_hint(
                lambda: profile(
                    net,
                    method,
                    size,
                    runtime=runtime.value,
                    device=device.value,
                    batch=batch,
                    threads=threads,
                    table=path,
                    exclude=exclude or [],
                ),
                size,
            )
        rows = _rows(result, net, method, size, exclude or [])
        if json_output:
            print_json(
                {
                    "table": str(path),
                    "key": result.to_dict()["key"],
                    "layers": rows,
                    "baseline_ms": result.baseline_ms(net, size),
                    "meta": result.meta,
                }
            )
            return
        out.print(_table(rows, f"{model}: {result.key.describe()}"))
        out.print(
            f"whole model {result.baseline_ms(net, size):.3f} ms; "
            f"table {path} ({result.meta.get('profile_s', 0):.0f} s of measuring so far)"
        )


def _rows(
    table: LatencyTable, model: Any, method: str, size: list[int], exclude: list[str]
) -> list[dict[str, Any]]:
    from decomp.plan import candidate_calls

    rows = []
    for c, calls in candidate_calls(model, method, size, exclude):
        for call in calls:
            entry = table.entry(c.layer, c.method, call)
            best = min(entry["points"], key=lambda p: p["ms"])
            rows.append(
                {
                    "layer": c.lp.name,
                    "geometry": layer_signature(c.layer, c.method, call),
                    "dense_ms": entry["dense_ms"],
                    "best_ms": best["ms"],
                    "best_ranks": best["ranks"],
                }
            )
    return rows


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("layer", "dense ms", "fastest factorized ms", "at ranks", "speed-up"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for r in rows:
        table.add_row(
            r["layer"],
            f"{r['dense_ms']:.4f}",
            f"{r['best_ms']:.4f}",
            "x".join(map(str, r["best_ranks"])),
            f"{r['dense_ms'] / r['best_ms']:.2f}x",
        )
    return table
