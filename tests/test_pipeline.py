"""Tests of decomp.pipeline on tiny data: evaluate, the demo end to end, the cached baseline."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from decomp import pipeline
from decomp.checkpoint import load
from decomp.data import load_data
from decomp.metrics import competition_score, count_params
from tests.conftest import DIGIT_CLASSES, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (1, 16, 16)
CLASSES = DIGIT_CLASSES
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


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_evaluate_reports_everything_and_leaves_the_model_alone(digits):
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    model = tiny_net(in_channels=1, num_classes=CLASSES).train()
    model.fc.eval()  # mixed flags must come back exactly
    flags, before = [m.training for m in model.modules()], _state(model)
    m = pipeline.evaluate(model, bundle, latency=True, latency_repeats=2)
    assert ENTRY_KEYS <= m.keys() and m["split"] == "test" and m["num_samples"] == 40
    assert 0.0 <= m["f1"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0
    assert set(m["per_class_f1"]) == {"0", "1", "2", "3"}
    assert np.array(m["confusion_matrix"]).shape == (CLASSES, CLASSES)
    assert np.array(m["confusion_matrix"]).sum() == 40
    assert m["macs"] > 0 and m["macs_competition"] > 0 and m["params"] == count_params(model)
    assert m["competition_score"] == competition_score(m["macs_competition"], m["f1"])
    for batch in ("batch_1", "batch_64"):
        assert m["latency"]["cpu"][batch]["median_ms"] > 0
    assert [mod.training for mod in model.modules()] == flags
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)
    plain = pipeline.evaluate(model, bundle.val_loader, SIZE, latency=False, baseline_f1=0.5)
    assert plain["split"] == "given" and plain["latency"] is None
    assert plain["competition_score"] == competition_score(
        plain["macs_competition"], plain["f1"], baseline_f1=0.5
    )
    from_spec = pipeline.evaluate(model, str(digits), SIZE, latency=False)
    assert from_spec["f1"] == m["f1"] and from_spec["split"] == "test"


def test_evaluate_needs_an_input_size_for_a_bare_loader(digits):
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    with pytest.raises(ValueError, match="input_size"):
        pipeline.evaluate(tiny_net(1, num_classes=CLASSES), bundle.val_loader, latency=False)


def _demo(out: Path, digits: Path) -> dict:
    return pipeline.run_demo(
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
    assert pipeline._val_f1(load(out / "decomposed.pt"), bundle) == dec["val_f1"]

    with caplog.at_level(logging.INFO, logger="decomp.pipeline"):
        second = _demo(out, digits)
    assert second["baseline"]["reused"] is True
    assert any("reusing the cached baseline" in r.getMessage() for r in caplog.records)
    assert second["baseline"]["f1"] == first["baseline"]["f1"]
    assert second["decomposed"]["f1"] == first["decomposed"]["f1"], "calibration is seeded"

    console = Console(file=io.StringIO(), width=200)
    console.print(pipeline.demo_table(second))
    console.print(pipeline.evaluation_table(second["finetuned"]))
    text = console.file.getvalue()
    assert "before BN calibration" in text and "fine-tuned" in text and "ptflops" in text


def test_cached_baseline_is_not_reused_with_other_settings(digits, tmp_path):
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    path = tmp_path / "baseline.pt"
    args = ("tests.conftest:tiny_net", {"in_channels": 1}, bundle, SIZE, 1, path)
    pipeline.train_baseline(*args, batch_size=32, evaluate_test=False, data_name="digits")
    key = pipeline.baseline_config(*args[:2], "digits", SIZE, 1, 32, 0.1, 0, None, None)
    assert pipeline._cached_baseline(path, key, retrain=False) is not None
    assert pipeline._cached_baseline(path, key, retrain=True) is None
    assert pipeline._cached_baseline(path, {**key, "epochs": 2}, retrain=False) is None


def test_finetune_from_a_file_starts_from_its_weights(digits, tmp_path):
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    model = pipeline.build_model("tests.conftest:tiny_net", {"in_channels": 1}, CLASSES, SIZE)[0]
    src = tmp_path / "model.pt"
    pipeline._save(
        model,
        src,
        {
            "factory": "tests.conftest:tiny_net",
            "kwargs": {"in_channels": 1, "num_classes": CLASSES},
        },
        bundle,
        {},
    )
    start = pipeline._val_f1(load(src), bundle)
    out = tmp_path / "tuned.pt"
    outcome = pipeline.finetune(
        src,
        str(digits),
        teacher=src,
        epochs=1,
        output=out,
        batch_size=32,
        workers=0,
        evaluate_test=False,
        extra={"bn_calibrated": True},
    )
    assert outcome.history[0]["val_f1"] == start and outcome.path == str(out)
    assert (tmp_path / "tuned.pt.log.jsonl").exists() and not (tmp_path / "tuned.pt.ckpt").exists()
    saved = load(out)._decomp_meta["extra"]
    assert saved["finetune"]["best_epoch"] == outcome.best_epoch and saved["bn_calibrated"]
