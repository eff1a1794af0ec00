"""Every CUDA path of decomp in one short run (a few minutes on one GPU), results as JSON.

Checks, each timed and recorded whatever happens to the others:

- ``environment``: torch, CUDA, the GPU; which of decomp's dependencies are missing, and what
  each missing one costs (thop: MAC counts, so ``plan``; tensorly / tensorly-torch / ptflops:
  only the comparisons and the competition counter, not checked here);
- ``cuda_latency``: ``decomp.metrics.measure_latency`` and ``decomp.timing.paired_latency`` on
  the GPU (CUDA events), resnet18 at 64 px, batch 64, fused;
- ``profile_cuda``: ``decomp.latency.profile(..., device="cuda")``: a per-layer table timed with
  CUDA events, how long it took;
- ``target_latency_cuda``: ``decomp.plan(..., target_latency=0.5, device="cuda")`` (needs thop),
  the landing measured paired;
- ``finetune_amp_channels_last``: ``decomp.train.train`` of a Tucker-factorized small net on
  CUDA with ``amp="auto"`` (bf16 where supported, else fp16 with a GradScaler) and
  channels-last batches;
- ``ddp_nccl``: ``torchrun`` with one process per GPU (at most 2): an NCCL all-reduce, one
  DistributedDataParallel step, and ``decomp.train.train`` under torchrun (decomp's own DDP
  branch needs 2 processes, i.e. 2 GPUs).

Usage, from the repository root of a GPU machine (no install needed, the repo goes on the
path)::

    python3 benchmarks/gpu_check.py            # writes benchmarks/results/gpu_check.json
    python3 benchmarks/gpu_check.py --dry-run  # the same code on the CPU (gloo), to runs/

Exit status 0 when every check passed or was skipped for a missing package, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"
DRY_RESULTS = REPO / "runs" / "gpu_check_dry.json"
NEEDED = ("torch", "torchvision", "numpy", "scipy", "sklearn", "typer", "rich", "packaging")
OPTIONAL = {
    "thop": "ultralytics-thop: decomp.count_macs and so decomp.plan / decompose need it",
    "tensorly": "tensorly: only the comparisons with tensorly (benchmarks) need it",
    "tltorch": "tensorly-torch: only the comparisons with tltorch (benchmarks) need it",
    "ptflops": "ptflops: only the competition's MAC counter needs it",
    "onnx": "onnx: export and the onnxruntime latency runtime need it",
    "onnxruntime": "onnxruntime: the onnxruntime latency runtime needs it (not checked here)",
}
WHEEL_HINT = (
    "bring it as a wheel: on a machine with an index, `python3 -m pip download --no-deps "
    "--only-binary=:all: --python-version 3.12 -d wheels ultralytics-thop==2.2.3`, then here "
    "`python3 -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl` and "
    "`export PYTHONPATH=/tmp/site`"
)
SIZE = (3, 64, 64)


class Skip(Exception):
    """A check that cannot run here, and why."""


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def requires(*modules: str) -> None:
    missing = [m for m in modules if not has(m)]
    if missing:
        raise Skip(f"needs {', '.join(missing)}, missing here; {WHEEL_HINT}")


# --------------------------------------------------------------------------- checks


def check_environment(device: str) -> dict[str, Any]:
    import torch

    missing_needed = [m for m in NEEDED if not has(m)]
    if missing_needed:
        raise RuntimeError(f"decomp cannot run without {', '.join(missing_needed)}")
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "missing_optional": {m: why for m, why in OPTIONAL.items() if not has(m)},
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["bf16"] = torch.cuda.is_bf16_supported()
    elif device == "cuda":
        raise RuntimeError("torch sees no CUDA device; run with --dry-run on a CPU machine")
    return info


def _resnet18() -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def check_cuda_latency(device: str) -> dict[str, Any]:
    import decomp
    from decomp import timing
    from decomp.factorize import registry
    from decomp.metrics import measure_latency

    model = _resnet18()
    compressed = _factorized_copy(model, registry.get("tucker"), 0.25)
    single = measure_latency(decomp.fuse(model), SIZE, batch_size=64, device=device, repeats=10)
    paired = timing.paired_latency(model, compressed, SIZE, device=device, batch=64)
    return {"measure_latency_b64": single, "paired_tucker_quarter_b64": paired}


def _factorized_copy(model: Any, method: Any, ratio: float) -> Any:
    """Every 3x3 conv replaced by its factorized structure at ``ratio`` of its ranks (no
    decomposition work and no MAC counter: shapes are what latency depends on)."""
    import copy

    from torch import nn

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            ranks = [
                max(1, int(ratio * module.out_channels)),
                max(1, int(ratio * module.in_channels)),
            ]
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, method.build(module, ranks))
    return out


def check_profile(device: str, table_path: Path) -> dict[str, Any]:
    from decomp import latency

    start = time.perf_counter()
    table = latency.profile(_resnet18(), "auto", SIZE, device=device, batch=64, table=table_path)
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "geometries": len(table.layers),
        "baseline_ms": next(iter(table.models.values()))["baseline_ms"],
        "key": table.to_dict()["key"],
    }


def check_target_latency(device: str, table_path: Path) -> dict[str, Any]:
    requires("thop")
    import decomp

    model = _resnet18()
    start = time.perf_counter()
    plan = decomp.plan(
        model,
        "auto",
        input_size=SIZE,
        target_latency=0.5,
        device=device,
        batch=64,
        latency_table=table_path,
    )
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "factorized": len(plan.decomposed),
        "latency": plan.latency,
    }


def _digits_loaders(shard: bool = False) -> tuple[Any, Any]:
    """scikit-learn's 8x8 digits (shipped with it) as 3x32x32 images, train and val loaders;
    with ``shard``, the train loader has a DistributedSampler (inside a process group)."""
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=32).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    train, val = TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])
    sampler = DistributedSampler(train, seed=0) if shard else None
    loader = DataLoader(train, batch_size=64, shuffle=sampler is None, sampler=sampler)
    return loader, DataLoader(val, batch_size=256)


def _small_factorized_net() -> Any:
    import torch
    from torch import nn

    from decomp.factorize import registry

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    net[3] = registry.get("tucker").factorize(net[3], [16, 8])
    return net


def check_finetune(device: str) -> dict[str, Any]:
    import torch

    from decomp.devices import autocast_dtype
    from decomp.train import TrainConfig, train

    train_loader, val_loader = _digits_loaders()
    config = TrainConfig(epochs=2, lr=0.05, amp="auto", channels_last=True, schedule="cosine")
    result = train(
        _small_factorized_net(), train_loader, val_loader, config, device=device, progress=False
    )
    dtype = autocast_dtype("auto", torch.device(device))
    return {"autocast_dtype": str(dtype), "history": result.history, "best_val_f1": result.best_f1}


def check_ddp(device: str) -> dict[str, Any]:
    import torch

    nproc = min(2, torch.cuda.device_count()) if device == "cuda" else 2
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(Path(__file__).resolve()),
            "--ddp-worker",
            folder,
            "--device",
            device,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
        reports = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]
    if done.returncode != 0 or len(reports) != nproc:
        raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr[-2000:]}")
    return {"processes": nproc, "ranks": reports}


def ddp_worker(folder: str, device: str) -> None:
    """One torchrun process: NCCL (gloo on the CPU) all-reduce, a DDP step, decomp.train."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from decomp.distributed import cleanup_distributed, setup_distributed
    from decomp.train import TrainConfig, train

    rank = int(os.environ["RANK"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    where = torch.device(device, int(os.environ["LOCAL_RANK"])) if device == "cuda" else None
    value = torch.ones(1, device=where) * (rank + 1)
    dist.all_reduce(value)
    net = _small_factorized_net().to(where or "cpu")
    ddp = DistributedDataParallel(net, device_ids=[where.index] if where is not None else None)
    loss = ddp(torch.randn(8, 3, 32, 32, device=where)).sum()
    loss.backward()
    _, world, _ = setup_distributed()  # decomp's join: finds the group made above
    train_loader, val_loader = _digits_loaders(shard=world > 1)
    config = TrainConfig(epochs=1, lr=0.05, amp="auto", channels_last=device == "cuda")
    result = train(_small_factorized_net(), train_loader, val_loader, config, progress=False)
    report = {
        "rank": rank,
        "world": world,
        "decomp_ddp_branch": world > 1,
        "backend": dist.get_backend(),
        "all_reduce": float(value.item()),
        "ddp_step_loss": float(loss.item()),
        "train_val_f1": result.history[-1].get("val_f1"),
    }
    Path(folder, f"rank{rank}.json").write_text(json.dumps(report))
    cleanup_distributed()


# --------------------------------------------------------------------------- driver


def run_check(name: str, fn: Callable[[], dict], results: dict, path: Path) -> None:
    start = time.perf_counter()
    try:
        entry = {"status": "ok", **fn()}
    except Skip as why:
        entry = {"status": "skipped", "reason": str(why)}
    except Exception as exc:  # record and go on: one failure must not hide the other checks
        entry = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=6),
        }
    entry["seconds"] = round(time.perf_counter() - start, 1)
    results["checks"][name] = entry
    print(
        f"{name}: {entry['status']} ({entry['seconds']} s)"
        + (f" - {entry.get('reason') or entry.get('error')}" if entry["status"] != "ok" else ""),
        flush=True,
    )
    _write(path, results)


def _write(path: Path, results: dict) -> None:
    from decomp._utils import atomic_write_text, plain

    atomic_write_text(path, json.dumps(plain(results), indent=1) + "\n", parents=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--ddp-worker", metavar="FOLDER", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, device)
        return 0
    missing = [m for m in NEEDED if not has(m)]
    if missing:
        print(f"cannot run: {', '.join(missing)} missing; decomp needs them", file=sys.stderr)
        return 1
    for module, why in OPTIONAL.items():
        if not has(module):
            print(f"note: {module} is missing ({why})", flush=True)
    path = args.output or (DRY_RESULTS if args.dry_run else RESULTS)
    from decomp._utils import machine

    results: dict[str, Any] = {"device": device, "machine": machine(), "checks": {}}
    table = path.with_name(path.stem + "_table.json")
    table.unlink(missing_ok=True)
    checks = [
        ("environment", lambda: check_environment(device)),
        ("cuda_latency", lambda: check_cuda_latency(device)),
        ("profile_cuda", lambda: check_profile(device, table)),
        ("target_latency_cuda", lambda: check_target_latency(device, table)),
        ("finetune_amp_channels_last", lambda: check_finetune(device)),
        ("ddp_nccl", lambda: check_ddp(device)),
    ]
    start = time.perf_counter()
    for name, fn in checks:
        run_check(name, fn, results, path)
    results["seconds"] = round(time.perf_counter() - start, 1)
    table.unlink(missing_ok=True)
    _write(path, results)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0 if all(c["status"] in ("ok", "skipped") for c in results["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
