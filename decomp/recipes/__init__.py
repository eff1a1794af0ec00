"""The workflows the command line and the benchmarks share; each returns plain data and logs.

- :mod:`decomp.recipes.training`: build a model, train a baseline (reusing a cached one when its
  settings match), fine-tune with distillation, on several processes under torchrun.
- :mod:`decomp.recipes.compression`: compress a model file (plan, factorize, re-estimate batch norm,
  save atomically) and inspect what each method would do.
"""

from decomp.recipes.compression import (
    CALIBRATION_BATCHES,
    DEFAULT_METHOD,
    DEFAULT_RANK,
    CompressResult,
    compress,
    inspect_model,
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
    "FINETUNE_EPOCHS",
    "FINETUNE_LR",
    "CompressResult",
    "TrainingOutcome",
    "baseline_config",
    "build_model",
    "cached_baseline",
    "compress",
    "finetune",
    "inspect_model",
    "load_bundle",
    "train_baseline",
]
