"""Models whose forward returns a tuple or a dict: export and evaluation use one output (the
first, or the one named), and say clearly when there is none to use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from decomp._utils import select_output
from decomp.export import export
from decomp.metrics import evaluate_model

SIZE = (3, 8, 8)


class TwoHeads(nn.Module):
    """Logits plus an auxiliary output, as a tuple or as a dict."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.logits = nn.Linear(8 * 64, 4)
        self.aux = nn.Linear(8 * 64, 2)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        if self.as_dict:
            return {"logits": self.logits(h), "aux": self.aux(h)}
        return self.logits(h), self.aux(h)


def test_select_output_picks_the_first_or_the_named_entry() -> None:
    t, u = torch.zeros(2), torch.ones(3)
    assert select_output(t) is t
    assert select_output((t, u)) is t and select_output((t, u), 1) is u
    assert select_output([t, u], "-1") is u
    assert select_output({"a": t, "b": u}) is t and select_output({"a": t, "b": u}, "b") is u


@pytest.mark.parametrize(
    "value, key, message",
    [
        ((torch.zeros(1),), 3, "tuple of 1; entry 3 is not a tensor"),
        ({"a": torch.zeros(1)}, "logits", r"dict with keys \['a'\]; entry 'logits'"),
        (("text", torch.zeros(1)), None, "its first entry is not a tensor"),
        (None, None, "returned a NoneType"),
    ],
)
def test_select_output_says_what_it_got(value, key, message) -> None:
    with pytest.raises(ValueError, match=message):
        select_output(value, key)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("as_dict, key, head", [(False, None, "logits"), (True, "aux", "aux")])
def test_export_writes_the_chosen_output(tmp_path: Path, fmt, as_dict, key, head) -> None:
    model = TwoHeads(as_dict).eval()
    error = export(model, tmp_path / f"m.{fmt}", fmt, SIZE, output=key)
    assert error is not None and error < 1e-4
    if fmt == "torchscript":
        x = torch.randn(2, *SIZE)
        loaded = torch.jit.load(str(tmp_path / "m.torchscript"))
        with torch.no_grad():
            expected = getattr(model, head)(model.body(x))
            torch.testing.assert_close(loaded(x), expected)


def test_export_of_an_unusable_output_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="entry 'nope'"):
        export(TwoHeads(as_dict=True).eval(), tmp_path / "m.onnx", "onnx", SIZE, output="nope")
    assert not list(tmp_path.iterdir())


def test_evaluation_reads_the_logits_of_a_tuple() -> None:
    model = TwoHeads().eval()
    x = torch.randn(16, *SIZE)
    with torch.no_grad():
        labels = model(x)[0].argmax(1)
    summary = evaluate_model(model, [(x, labels)], num_classes=4)
    assert summary["accuracy"] == 1.0
    aux = evaluate_model(model, [(x, labels % 2)], num_classes=2, output=1)
    assert aux["num_samples"] == 16


def test_the_command_line_names_an_output(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from decomp.cli import app

    path = tmp_path / "heads.pt"
    torch.save(TwoHeads(as_dict=True).state_dict(), path)
    args = ["export", str(path), "--arch", "tests.test_outputs:TwoHeads", "--input-size", "3,8,8"]
    args += ["--arch-kwargs", '{"as_dict": true}', "-o", str(tmp_path / "m.onnx")]
    ok = CliRunner().invoke(app, [*args, "--model-output", "aux"])
    assert ok.exit_code == 0 and "matches PyTorch" in ok.stdout, ok.output
    bad = CliRunner().invoke(app, [*args, "--model-output", "nope", "-o", str(tmp_path / "n.onnx")])
    assert bad.exit_code == 1 and "--model-output" in bad.output and "Traceback" not in bad.output
