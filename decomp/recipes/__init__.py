"""The workflows the command line and the benchmarks share; each returns plain data and logs.

- :mod:`decomp.recipes.training`: build a model, train a baseline (reusing a cached one when its
  settings match), fine-tune with distillation, on several processes under torchrun.
- :mod:`decomp.recipes.compression`: compress a model file (plan, factorize, re-estimate batch norm,
  save atomically) and inspect what each method would do.
- :mod:`decomp.recipes.staged`: compress to a MACs target in stages (decompose, calibrate,
  distil, N times), checkpointed and resumable.
"""

from decomp.recipes.compression import (
    CALIBRATION_BATCHES,
    DEFAULT_METHOD,
    DEFAULT_RANK,
    CompressResult,
    compress,
    inspect_model,
)
from decomp.recipes.staged import (
    EPOCHS_PER_STAGE,
    STAGED_METHOD,
    STAGES,
    StagedResult,
    StageRecord,
    compress_in_stages,
    state_path,
)
from decomp.recipes.training import (
    BASELINE_EPOCHS,
    DEFAULT_ARCH,
    DEFAULT_BASELINE_OUTPUT,
    DEFAULT_DATA,
    DEFAULT_INPUT_SIZE,
    FINETUNE_EPOCHS,
    FINETUNE_LR,
    TrainingOutcome,
    baseline_config,
    build_model,
    cached_baseline,
    finetune,
    load_bundle,
    train_baseline,
)

__all__ = [
    "BASELINE_EPOCHS",
    "CALIBRATION_BATCHES",
    "DEFAULT_ARCH",
    "DEFAULT_BASELINE_OUTPUT",
    "DEFAULT_DATA",
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_METHOD",
    "DEFAULT_RANK",
    "EPOCHS_PER_STAGE",
    "FINETUNE_EPOCHS",
    "FINETUNE_LR",
    "STAGED_METHOD",
    "STAGES",
    "StageRecord",
    "StagedResult",
    "CompressResult",
    "TrainingOutcome",
    "baseline_config",
    "build_model",
    "cached_baseline",
    "compress",
    "compress_in_stages",
    "finetune",
    "inspect_model",
    "load_bundle",
    "state_path",
    "train_baseline",
]
