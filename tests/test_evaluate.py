"""decomp.evaluate on tiny data: every measurement, the model left alone, the input size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decomp.data import load_data
from decomp.evaluate import evaluate
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
    m = evaluate(model, bundle, latency=True, latency_repeats=2)
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
    plain = evaluate(model, bundle.val_loader, SIZE, latency=False, baseline_f1=0.5)
    assert plain["split"] == "given" and plain["latency"] is None
    assert plain["competition_score"] == competition_score(
        plain["macs_competition"], plain["f1"], baseline_f1=0.5
    )
    from_spec = evaluate(model, str(digits), SIZE, latency=False)
    assert from_spec["f1"] == m["f1"] and from_spec["split"] == "test"


def test_evaluate_needs_an_input_size_for_a_bare_loader(digits):
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    with pytest.raises(ValueError, match="input_size"):
        evaluate(tiny_net(1, num_classes=CLASSES), bundle.val_loader, latency=False)
