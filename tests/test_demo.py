"""decomp.demo end to end on tiny data: results.json, the plot, the cached baseline, the tables."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from rich.console import Console

from decomp.checkpoint import load
from decomp.cli.render import demo_table, evaluation_table
from decomp.data import load_data
from decomp.demo import run_demo
from decomp.evaluate import val_f1

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (1, 16, 16)
ENTRY_KEYS = {
    "f1",
    "accuracy",
    "per_class_f1",
    "confusion_matrix",
    "macs",
    "macs_competition",
    "params",
    "competition_score",
    "latency",
}


def _demo(out: Path, digits: Path) -> dict:
    return run_demo(
        out,
        epochs=1,
        finetune_epochs=1,
        rank="ratio:0.5",
        data=str(digits),
        arch="tests.conftest:tiny_net",
        arch_kwargs={"in_channels": 1},
        input_size=SIZE,
        batch_size=32,
        calibration_batches=2,
        latency_repeats=2,
    )


def test_run_demo_writes_results_and_reuses_its_baseline(digits, tmp_path, caplog):
    out = tmp_path / "demo"
    first = _demo(out, digits)
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "done" and saved["baseline"]["f1"] == first["baseline"]["f1"]
    for name in ("baseline", "decomposed", "finetuned"):
        assert ENTRY_KEYS <= saved[name].keys(), name
    dec = saved["decomposed"]
    assert {"f1_before_calibration", "f1_after_calibration"} <= dec.keys()
    assert dec["macs"] < saved["baseline"]["macs"] and dec["plan"]["layers"]
    assert {"config", "timings", "versions", "machine", "summary"} <= saved.keys()
    assert saved["baseline"]["reused"] is False and "baseline" in saved["timings"]
    assert (out / "f1_vs_macs.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.ckpt")), "training checkpoints are removed once saved"

    baseline = load(out / "baseline.pt")
    meta = baseline._decomp_meta
    assert meta["input_size"] == list(SIZE) and meta["class_names"] == ["0", "1", "2", "3"]

    # no re-initialisation: the reloaded decomposed file predicts exactly as before, and
    # fine-tuning starts from the validation F1 the decomposed model had
    assert dec["reload"]["max_logit_diff_after_reload"] == 0.0
    assert dec["reload"]["finetune_start_val_f1"] == dec["val_f1"]
    assert saved["finetuned"]["history"][0]["val_f1"] == dec["val_f1"]
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    assert val_f1(load(out / "decomposed.pt"), bundle) == dec["val_f1"]

    with caplog.at_level(logging.INFO, logger="decomp.recipes"):
        second = _demo(out, digits)
    assert second["baseline"]["reused"] is True
    assert any("reusing the cached baseline" in r.getMessage() for r in caplog.records)
    assert second["baseline"]["f1"] == first["baseline"]["f1"]
    assert second["decomposed"]["f1"] == first["decomposed"]["f1"], "calibration is seeded"

    console = Console(file=io.StringIO(), width=200)
    console.print(demo_table(second))
    console.print(evaluation_table(second["finetuned"]))
    text = console.file.getvalue()
    assert "before BN calibration" in text and "fine-tuned" in text and "ptflops" in text
