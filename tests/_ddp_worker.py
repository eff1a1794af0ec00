"""Worker of the DDP test, launched twice by ``python -m torch.distributed.run``.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR``.
Each rank trains the tiny test network for a few epochs on the CPU (gloo) and saves its initial and
final weights to ``OUT_DIR/rank{r}.pt``; rank 0 also writes the log and the checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_task import TinyNet, make_data  # noqa: E402

from decomp.distributed import cleanup_distributed, setup_distributed  # noqa: E402
from decomp.train import TrainConfig, train  # noqa: E402


def main(out: Path) -> None:
    """Train on this rank and save what the test checks."""
    torch.set_num_threads(1)
    rank, world, _ = setup_distributed()
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = TinyNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train_set, val_set = make_data(256, seed=0), make_data(128, seed=1)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    config = TrainConfig(
        epochs=3,
        lr=0.05,
        schedule="constant",
        log_path=out / "log.jsonl",
        checkpoint_path=out / "ckpt.pt",
    )
    result = train(
        model,
        DataLoader(train_set, batch_size=16, sampler=sampler),
        DataLoader(val_set, batch_size=64),
        config,
        progress=False,
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = {"initial": initial, "final": state, "history": result.history, "world": world}
    report["best_epoch"] = result.best_epoch
    torch.save(report, out / f"rank{rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
