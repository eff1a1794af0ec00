"""decomp.recipes on tiny data: the cached baseline, fine-tuning from a file, compressing a file."""

from __future__ import annotations

import pytest

from decomp.checkpoint import load, model_meta, save
from decomp.data import Preprocessing, load_data, recorded_preprocessing
from decomp.evaluate import val_f1
from decomp.metrics import count_macs
from decomp.recipes import (
    baseline_config,
    build_model,
    cached_baseline,
    compress,
    finetune,
    inspect_model,
    train_baseline,
    training,
)
from tests.conftest import DIGIT_CLASSES, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (1, 16, 16)
CLASSES = DIGIT_CLASSES
TINY_ARCH = {
    "factory": "tests.conftest:tiny_net",
    "kwargs": {"in_channels": 1, "num_classes": CLASSES},
}


def test_cached_baseline_is_not_reused_with_other_settings(digits, tmp_path):
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    path = tmp_path / "baseline.pt"
    args = ("tests.conftest:tiny_net", {"in_channels": 1}, bundle, SIZE, 1, path)
    train_baseline(*args, batch_size=32, evaluate_test=False, data_name="digits")
    key = baseline_config(*args[:2], "digits", SIZE, 1, 32, 0.1, 0, None, None)
    assert cached_baseline(path, key, retrain=False) is not None
    assert cached_baseline(path, key, retrain=True) is None
    assert cached_baseline(path, {**key, "epochs": 2}, retrain=False) is None


def test_finetune_from_a_file_starts_from_its_weights(digits, tmp_path):
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    model = build_model("tests.conftest:tiny_net", {"in_channels": 1}, CLASSES, SIZE)[0]
    src = tmp_path / "model.pt"
    save(
        model,
        src,
        arch={
            "factory": "tests.conftest:tiny_net",
            "kwargs": {"in_channels": 1, "num_classes": CLASSES},
        },
        input_size=list(bundle.input_size),
        class_names=bundle.class_names,
    )
    start = val_f1(load(src), bundle)
    out = tmp_path / "tuned.pt"
    outcome = finetune(
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
    saved = model_meta(load(out))["extra"]
    assert saved["finetune"]["best_epoch"] == outcome.best_epoch and saved["bn_calibrated"]


def test_compress_a_file_plans_applies_calibrates_and_saves(digits, tmp_path):
    src = tmp_path / "model.pt"
    save(tiny_net(in_channels=1, num_classes=CLASSES), src, arch=TINY_ARCH, input_size=SIZE)
    seen, steps = [], []
    dry = compress(src, None, rank="ratio:0.5", dry_run=True, on_plan=seen.append)
    assert dry.status == "dry_run" and dry.output is None and seen == [dry.plan]
    assert dry.input == str(src) and dry.input_size == list(SIZE)
    out = tmp_path / "small.pt"
    result = compress(src, out, rank="ratio:0.5", data=str(digits), progress=steps.append)
    assert result.status == "written" and result.bn_calibrated and out.exists()
    assert steps == [lp.name for lp in result.plan.decomposed]
    assert result.macs_after == count_macs(load(out), SIZE) < result.macs_before
    record = result.to_dict()
    assert record["macs_reduction"] == result.macs_before / result.macs_after
    assert model_meta(load(out))["extra"]["decompose"]["rank"] == "ratio:0.5"
    again = compress(load(src), tmp_path / "again.pt", plan=result.plan)
    assert again.macs_after == result.macs_after and again.input == str(src.resolve())
    nothing = compress(src, tmp_path / "none.pt", rank="ratio:0.5", exclude=["*"])
    assert nothing.status == "nothing_to_decompose" and not (tmp_path / "none.pt").exists()
    with pytest.raises(ValueError, match="weigh_layers needs target_macs and data"):
        compress(src, out, weigh_layers=True)


def test_inspect_model_plans_every_method():
    model = tiny_net(in_channels=1, num_classes=CLASSES)
    report = inspect_model(model, SIZE, "ratio:0.5", methods=("tucker", "svd"))
    assert set(report["plans"]) == {"tucker", "svd"} and report["kind"] is None
    assert report["macs"] == count_macs(model, SIZE) and report["macs_competition"] > 0


def test_compress_on_a_folder_without_val_records_what_it_used(digits, tmp_path, monkeypatch):
    src = tmp_path / "model.pt"
    save(tiny_net(in_channels=1, num_classes=CLASSES), src, arch=TINY_ARCH, input_size=SIZE)
    prep = Preprocessing(mean=(0.5,), std=(0.5,), resize="crop")
    out = tmp_path / "small.pt"
    flat = digits / "val"  # class folders only: 40 images, no val/ of its own
    result = compress(src, out, rank="ratio:0.5", data=str(flat), preprocessing=prep)
    assert result.calibration == {"layers": 2, "batches": 1, "images": 40, "batches_asked": 30}
    assert result.plan.fit == "outputs" and result.plan.fit_images == 40
    record = result.to_dict()
    assert (
        record["calibration"] == result.calibration and record["preprocessing"]["resize"] == "crop"
    )
    extra = model_meta(load(out))["extra"]
    assert extra["bn_calibrated"] and extra["calibration"]["images"] == 40
    assert recorded_preprocessing(load(out)) == prep
    weights = compress(src, None, rank="ratio:0.5", data=str(flat), fit="weights", dry_run=True)
    assert weights.plan.fit == "weights"
    seen = []
    monkeypatch.setattr(training, "load_data", lambda *a, **k: seen.append(k) or load_data(*a, **k))
    tuned = tmp_path / "tuned.pt"
    finetune(out, str(digits), epochs=0, output=tuned, workers=0, evaluate_test=False)
    assert seen[0]["preprocessing"] == prep  # a later command reads data the same way
    assert recorded_preprocessing(load(tuned)) == prep
    with pytest.raises(FileNotFoundError, match="neither 'fashion-mnist"):
        compress(src, tmp_path / "x.pt", data=str(tmp_path / "absent"))
    assert not (tmp_path / "x.pt").exists()


def test_baseline_settings_hold_the_preprocessing_only_when_not_the_default():
    args = ("tests.conftest:tiny_net", None, "data", SIZE, 1, 32, 0.1, 0, None, None)
    key = baseline_config(*args)
    assert "preprocessing" not in key  # baselines cached before it was recorded stay valid
    assert baseline_config(*args, preprocessing=Preprocessing()) == key
    crop = baseline_config(*args, preprocessing=Preprocessing(resize="crop"))
    assert crop["preprocessing"]["resize"] == "crop"
