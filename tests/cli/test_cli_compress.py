"""decomp.cli.compress: decompose (also standalone), inspect, export, and every bad input; the
apps, console scripts and exit codes."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner, Result

import decomp
from decomp import checkpoint
from decomp.checkpoint import load
from decomp.cli import app, decompose_app
from decomp.cli import training as cli_training
from decomp.data import Preprocessing
from decomp.recipes import compression
from tests.conftest import REPO, tiny_net

TINY = ["--arch", "tests.conftest:TinyNet", "--input-size", "3,16,16"]
RESNET = ["--arch", "torchvision.models:resnet18", "--arch-kwargs", '{"num_classes": 9}']
BIN = Path(sys.executable).parent
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine OpenMP spinning makes eigh 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DECOMP_DEBUG", raising=False)


def run(*args: str | Path, command: object = decompose_app) -> Result:
    return runner.invoke(command, [str(a) for a in args])


def decomp_cli(*args: str | Path) -> Result:
    return run(*args, command=app)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _out(model: nn.Module, size: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


def assert_one_line_error(result: Result, *fragments: str, quiet: bool = True) -> None:
    """Exit code 1, one line on stderr that starts with 'error:'; with ``quiet`` no stdout."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if quiet:
        assert result.stdout == ""


def assert_usage_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output


@pytest.fixture
def tiny_sd(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_sd.pt"
    torch.save(tiny_net().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decomp file: tiny_net with its 3x3 convs at half Tucker ranks, input size recorded."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.save(tiny_net().state_dict(), folder / "sd.pt")
    result = run(folder / "sd.pt", *TINY, "--rank", "ratio:0.5")
    assert result.exit_code == 0, result.output
    return folder / "sd_tucker.pt"


@pytest.fixture(scope="module")
def resnet_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18_sd.pt"
    torch.save(torchvision.models.resnet18(num_classes=9).state_dict(), path)
    return path


# ------------------------------------------------------------------- the example


def _check_compressed(path: Path, original: Path, size: tuple[int, int, int]) -> nn.Module:
    """Loads with no flags; same output shape as the original; fewer MACs."""
    model = load(path)
    base = load(original, arch=RESNET[1], arch_kwargs=RESNET[3])
    assert _out(model, size).shape == _out(base, size).shape == (2, 9)
    assert decomp.count_macs(model, size) < decomp.count_macs(base, size)
    return model


def test_worked_example_tucker_console_script(resnet_sd: Path) -> None:
    """The issue's command, run as the installed console script."""
    args = [str(BIN / "decompose"), str(resnet_sd), *RESNET]
    args += ["--method", "tucker", "--rank", "ratio:0.5", "--input-size", "3,64,64"]
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "layer4.1.conv2" in proc.stdout and "wrote" in proc.stdout
    output = resnet_sd.with_name("resnet18_sd_tucker.pt")
    model = _check_compressed(output, resnet_sd, (3, 64, 64))
    assert model.layer4[1].conv2.core.weight.shape == (256, 256, 3, 3)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("cp", ["--rank", "4", "--exclude", "layer3.*", "--exclude", "layer4.*"]),
        ("svd", ["--rank", "ratio:0.5"]),
        ("auto", ["--rank", "ratio:0.5", "--exclude", "layer4.*"]),
    ],
)
def test_worked_example_other_methods(
    resnet_sd: Path, tmp_path: Path, method: str, extra: list[str]
) -> None:
    output = tmp_path / f"{method}.pt"
    result = decomp_cli(
        "decompose", resnet_sd, *RESNET, "--method", method, "--input-size", "3,64,64",
        *extra, "--output", output,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = _check_compressed(output, resnet_sd, (3, 64, 64))
    plan = decomp.applied_plans(model)[0]
    assert plan["method"] == method
    assert any(lp["method"] == ("tucker" if method == "auto" else method) for lp in plan["layers"])
    excluded = tuple(p.rstrip("*") for p in extra[3::2])
    for lp in plan["layers"]:
        if excluded and lp["name"].startswith(excluded):
            assert lp["reason"].startswith("excluded by") and not lp["method"]


def _trained_digits_net(steps: int = 150) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """tiny_net (1 channel, width 32) trained briefly on scikit-learn's 8x8 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    model = tiny_net(in_channels=1, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


def test_vbmf_ranks_on_a_trained_model(tmp_path: Path) -> None:
    """Plain vbmf (the default rank) finds structure in trained kernels."""
    model, x, y = _trained_digits_net()
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    kwargs = '{"in_channels": 1, "width": 32}'
    result = run(
        tmp_path / "digits.pt", "--arch", "tests.conftest:TinyNet", "--arch-kwargs", kwargs,
        "--method", "auto", "--input-size", "1,8,8", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ranks = {lp["name"]: lp["ranks"] for lp in report["plan"]["layers"] if lp["method"]}
    assert report["rank"] == "vbmf"
    assert {"conv1", "conv2"} <= set(ranks)
    assert all(0 < r < 32 for r in ranks["conv1"] + ranks["conv2"])
    assert report["macs_after"] < report["macs_before"]
    small = load(report["output"])
    with torch.no_grad():
        accuracy = (small(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.6, accuracy  # 0.90 measured; 0.99 before; chance is 0.1


# ----------------------------------------------------------------- dry run, plan, json


def test_dry_run_writes_nothing(tiny_sd: Path) -> None:
    before = _files(tiny_sd.parent)
    result = run(tiny_sd, *TINY, "--rank", "ratio:0.5", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "conv1" in result.stdout and "dry run: nothing written" in result.stdout
    assert _files(tiny_sd.parent) == before


def test_edited_plan_is_applied(tiny_sd: Path, tmp_path: Path) -> None:
    result = run(tiny_sd, *TINY, "--rank", "ratio:0.5", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    layer = next(lp for lp in plan["layers"] if lp["name"] == "conv1")
    assert layer["ranks"] == [8, 8]
    layer["ranks"] = [5, 3]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    output = tmp_path / "edited.pt"
    args = ("--arch", TINY[1], "--plan", tmp_path / "plan.json", "-o", output, "--json")
    result = run(tiny_sd, *args)
    assert result.exit_code == 0, result.output
    model = load(output)
    assert model.conv1.core.weight.shape == (5, 3, 3, 3)
    assert model.conv2.core.weight.shape == (8, 8, 3, 3)
    report = json.loads(result.stdout)  # the costs describe the edited ranks, not the file's
    edited = next(lp for lp in report["plan"]["layers"] if lp["name"] == "conv1")
    assert edited["macs_after"] < layer["macs_after"]
    assert edited["params_after"] == model.conv1.core.weight.numel() + sum(
        m.weight.numel() for m in (model.conv1.first, model.conv1.last)
    )
    size = tuple(report["input_size"])
    assert (
        report["plan"]["model_macs"]
        - sum(
            lp["macs_before"] - lp["macs_after"] for lp in report["plan"]["layers"] if lp["method"]
        )
        == report["macs_after"]
        == decomp.count_macs(model, size)
    )


def test_json_output_is_the_only_stdout(tiny_sd: Path) -> None:
    result = run(tiny_sd, *TINY, "--rank", "ratio:0.5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "written" and report["input"] == str(tiny_sd)
    assert report["output"] == str(tiny_sd.with_name("tiny_sd_tucker.pt"))
    assert report["decomposed"] == 3 and report["layers"] == 5
    assert report["macs_after"] < report["macs_before"]
    assert report["params_after"] < report["params_before"]
    assert decomp.Plan.from_dict(report["plan"]).method == "tucker"


def test_nothing_to_decompose_is_said_plainly(tiny_sd: Path) -> None:
    """vbmf on random weights finds only noise: exit 0, a plain sentence, no file."""
    before = _files(tiny_sd.parent)
    result = run(tiny_sd, *TINY)
    assert result.exit_code == 0, result.output
    assert "nothing to decompose" in result.stdout and "no file written" in result.stdout
    assert _files(tiny_sd.parent) == before
    report = json.loads(run(tiny_sd, *TINY, "--json").stdout)
    assert report["status"] == "nothing_to_decompose" and report["output"] is None


def test_decompose_a_decomp_file_again(tiny_file: Path, tmp_path: Path) -> None:
    """The input size and arch come from the file; the factorized layers are left alone."""
    output = tmp_path / "again.pt"
    result = decomp_cli("decompose", tiny_file, "--method", "svd", "--rank", "2", "-o", output)
    assert result.exit_code == 0, result.output
    model = load(output)
    assert [p["method"] for p in decomp.applied_plans(model)] == ["tucker", "svd"]
    assert "already factorized" in result.stdout
    assert model.fc.first.weight.shape == (2, 32)


def test_exclude_leaves_layers_alone(tiny_sd: Path) -> None:
    result = run(tiny_sd, *TINY, "--rank", "ratio:0.5", "--exclude", "conv*", "--dry-run", "--json")
    plan = json.loads(result.stdout)
    reasons = {lp["name"]: lp["reason"] for lp in plan["layers"]}
    assert reasons["conv1"] == reasons["conv2"] == "excluded by 'conv*'"


# ------------------------------------------------------------- calibration data (--data)


def test_decompose_calibrates_on_a_folder_without_val(
    tiny_sd: Path, digits: Path, tmp_path: Path
) -> None:
    """A folder of class folders (no val/) is calibration data; what was used is said, with a
    warning under 256 images, and recorded with the preprocessing for later commands."""
    out, flat = tmp_path / "small.pt", digits / "val"  # 40 images, class folders only
    args = (tiny_sd, *TINY, "--rank", "ratio:0.5", "--data", flat)
    result = run(*args, "--normalize", "minus-one-one", "--resize", "crop", "-o", out)
    assert result.exit_code == 0, result.output
    assert (
        "re-estimated 2 batch-norm layers on 40 images (1 batch of 30 asked for)" in result.stdout
    )
    assert "fit their outputs on 40 calibration images" in result.stdout
    assert "from only 40 images are unsound" in " ".join(result.stderr.split())
    extra = torch.load(out, weights_only=True)["extra"]
    assert extra["calibration"] == {"layers": 2, "batches": 1, "images": 40, "batches_asked": 30}
    recorded = {"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "crop", "crop_fraction": 0.875}
    assert extra["bn_calibrated"] is True and extra["preprocessing"] == recorded
    again = run(
        out, "--method", "svd", "--rank", "2", "--data", flat, "--json", "-o", tmp_path / "2.pt"
    )
    report = json.loads(again.stdout)  # a later command reads the data as the file records
    assert report["preprocessing"] == recorded and report["plan"]["fit"] == "outputs"
    assert report["calibration"]["images"] == 40 and report["calibration"]["batches"] == 1
    weights = run(*args, "--fit", "weights", "--json", "-o", tmp_path / "w.pt")
    assert json.loads(weights.stdout)["plan"]["fit"] == "weights"


def test_evaluate_reads_data_as_the_file_records(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, sd = tmp_path / "small.pt", tmp_path / "four.pt"
    torch.save(tiny_net(num_classes=4).state_dict(), sd)
    args = ("--arch-kwargs", '{"num_classes": 4}', "--rank", "ratio:0.5", "--data", digits)
    assert run(sd, *TINY, *args, "--normalize", "unit", "-o", out).exit_code == 0
    seen = []
    real = cli_training.load_data
    monkeypatch.setattr(cli_training, "load_data", lambda *a, **k: seen.append(k) or real(*a, **k))
    flat = digits / "val"  # no val/ of its own: --val-split holds some out
    result = decomp_cli(
        "evaluate", out, "--data", flat, "--val-split", "8", "--json", "--no-latency"
    )
    assert result.exit_code == 0, result.output
    assert seen[-1]["preprocessing"] == Preprocessing(mean=(0.0,) * 3, std=(1.0,) * 3)
    assert seen[-1]["val_split"] == 8 and json.loads(result.stdout)["num_samples"] == 8
    crop = ("--resize", "crop", "--val-split", "0.2", "--no-latency")
    assert decomp_cli("evaluate", out, "--data", flat, *crop).exit_code == 0
    unit_crop = Preprocessing((0.0,) * 3, (1.0,) * 3, "crop")  # the option over the record
    assert seen[-1]["preprocessing"] == unit_crop and seen[-1]["val_split"] == 0.2


@pytest.mark.parametrize(
    ("layout", "message"),
    [("absent", "is neither 'fashion-mnist[:DIR]' nor an existing directory"),
     ("val-only", "has a val/ folder but no train/ folder beside it")],
)  # fmt: skip
def test_bad_data_fails_before_planning(
    tiny_sd: Path, tmp_path: Path, layout: str, message: str
) -> None:
    data = tmp_path / "data"
    if layout == "val-only":
        (data / "val" / "a").mkdir(parents=True)
    out = tmp_path / "small.pt"
    result = run(tiny_sd, *TINY, "--rank", "ratio:0.5", "--data", data, "-o", out)
    assert_one_line_error(result, message)  # no plan table: nothing was planned
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--fit", "outputs"], "--fit outputs fits the layers' outputs on calibration data"),
     (["--normalize", "unit"], "say how --data is read; pass --data"),
     (["--resize", "crop"], "say how --data is read; pass --data")],
)  # fmt: skip
def test_data_options_without_data(tiny_sd: Path, extra: list[str], message: str) -> None:
    assert_one_line_error(run(tiny_sd, *TINY, *extra), message)
    assert_usage_error(run(tiny_sd, *TINY, "--normalize", "bogus"), "bogus")


# -------------------------------------------------------------------- inspect and export


def test_inspect_shows_every_method(tiny_sd: Path) -> None:
    result = decomp_cli("inspect", tiny_sd, *TINY, "--rank", "ratio:0.5")
    assert result.exit_code == 0, result.output
    for word in ("tucker", "cp", "svd", "auto", "1x1 conv", "linear layer", "competition"):
        assert word in result.stdout
    report = json.loads(decomp_cli("inspect", tiny_sd, *TINY, "--json").stdout)
    assert report["macs"] > 0 and report["macs_competition"] > 0
    assert set(report["plans"]) == {"tucker", "cp", "svd", "auto"}


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(tiny_file: Path, tmp_path: Path, fmt: str) -> None:
    output = tmp_path / f"model.{fmt}"
    result = decomp_cli("export", tiny_file, "--format", fmt, "--output", output)
    assert result.exit_code == 0, result.output
    assert "matches PyTorch" in result.stdout
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = load(tiny_file)(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        with torch.no_grad():
            got = torch.jit.load(str(output))(x)
    assert (got - ref).norm() / ref.norm() < 1e-4
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_export_default_output_beside_the_input(tiny_file: Path) -> None:
    result = decomp_cli("export", tiny_file, "--format", "torchscript")
    assert result.exit_code == 0, result.output
    path = tiny_file.with_name(tiny_file.stem + ".torchscript.pt")
    assert path.is_file()
    path.unlink()


# --------------------------------------------------------------------------- bad input


def _write(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "model.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "truncated":
        torch.save(tiny_net().state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "tensor":
        torch.save(torch.ones(2, 2), path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory, not a model file"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is not a readable PyTorch file"),
        ("list", "holds a list of 3 items, not a model"),
        ("tensor", "holds a bare tensor of shape [2, 2], not a model"),
    ],
)
def test_bad_model_file(tmp_path: Path, kind: str, message: str) -> None:
    path = _write(tmp_path, kind)
    before = _files(tmp_path)
    assert_one_line_error(run(path, *TINY, "--rank", "ratio:0.5"), message)
    assert _files(tmp_path) == before


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_untrusted_pickle_payload_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    for result in (
        run(tmp_path / "evil.pt", "--input-size", "3,16,16"),
        decomp_cli("inspect", tmp_path / "evil.pt", "--input-size", "3,16,16"),
    ):
        assert_one_line_error(result, "runs code", "--trust-pickle", "state_dict")
    assert not marker.exists()
    assert _files(tmp_path) == {"evil.pt"}


def test_a_decomp_file_cannot_make_us_call_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = {
        "format": "decomp",
        "format_version": 1,
        "plans": [],
        "state_dict": {},
        "arch": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
    }
    torch.save(payload, tmp_path / "crafted.pt")
    result = run(tmp_path / "crafted.pt", "--input-size", "3,16,16")
    assert_one_line_error(result, "calling os:system", "decomp calls only nn.Module classes")
    assert not marker.exists()


def test_trusted_pickle_with_flag(tmp_path: Path) -> None:
    torch.save(tiny_net(), tmp_path / "whole.pt")
    assert_one_line_error(run(tmp_path / "whole.pt", "--input-size", "3,16,16"), "--trust-pickle")
    result = run(
        tmp_path / "whole.pt", "--trust-pickle", "--input-size", "3,16,16", "--rank", "0.5"
    )
    assert result.exit_code == 0, result.output
    assert "pickle" in result.stderr  # the output is a pickle again, and it says so
    assert load(tmp_path / "whole_tucker.pt", trust_pickle=True) is not None


def test_state_dict_without_arch(tiny_sd: Path) -> None:
    result = run(tiny_sd, "--input-size", "3,16,16")
    assert_one_line_error(result, "holds a state_dict", "--arch MODULE:FACTORY")


def test_arch_that_cannot_be_imported(tiny_sd: Path) -> None:
    result = run(tiny_sd, "--arch", "no_such_pkg.models:build", "--input-size", "3,16,16")
    assert_one_line_error(result, "cannot import 'no_such_pkg.models'")


def test_arch_without_the_attribute(tiny_sd: Path) -> None:
    result = run(tiny_sd, "--arch", "torchvision.models:resnet181", "--input-size", "3,16,16")
    assert_one_line_error(result, "has no attribute 'resnet181'", "did you mean")


def test_arch_kwargs_not_json(tiny_sd: Path) -> None:
    result = run(tiny_sd, *TINY, "--arch-kwargs", "{width: 8}")
    assert_one_line_error(result, "not valid JSON")


def test_state_dict_that_does_not_fit(tiny_sd: Path) -> None:
    result = run(tiny_sd, *RESNET, "--input-size", "3,16,16")
    assert_one_line_error(result, "do not fit torchvision.models:resnet18(num_classes=9)")
    assert "missing keys: layer1.0.conv1.weight" in result.stderr
    assert "unexpected keys: stem.0.weight" in result.stderr
    assert "conv1.weight (file [16, 16, 3, 3], model [64, 3, 7, 7])" in result.stderr


def test_unknown_method_is_a_usage_error(tiny_sd: Path) -> None:
    assert_usage_error(run(tiny_sd, *TINY, "--method", "pca"), "pca")


def test_unknown_option_and_missing_argument_are_usage_errors(tiny_sd: Path) -> None:
    assert_usage_error(run(tiny_sd, "--frobnicate"), "--frobnicate")
    assert_usage_error(decomp_cli("export", "--format", "onnx"), "MODEL")


def test_rank_spec_that_does_not_parse(tiny_sd: Path) -> None:
    result = run(tiny_sd, *TINY, "--rank", "ratio:2")
    assert_one_line_error(result, "'ratio:2'", "vbmf, vbmf:WF", "ratio:F", "energy:E")


@pytest.mark.parametrize("size", ["3,64", "3,a,64", "0,32,32", "3,32,32,1"])
def test_bad_input_size(tiny_sd: Path, size: str) -> None:
    result = run(tiny_sd, "--arch", TINY[1], "--input-size", size)
    assert_one_line_error(result, f"bad --input-size {size!r}", "C,H,W")


def test_input_size_needed_for_a_state_dict(tiny_sd: Path) -> None:
    result = run(tiny_sd, "--arch", TINY[1], "--rank", "0.5")
    assert_one_line_error(result, "--input-size C,H,W is needed")


def test_input_size_that_does_not_fit_the_model(tiny_sd: Path) -> None:
    result = run(tiny_sd, "--arch", TINY[1], "--input-size", "1,16,16", "--rank", "0.5")
    assert_one_line_error(result, "forward pass failed", "check --input-size")


def test_output_folder_that_does_not_exist(tiny_sd: Path, tmp_path: Path) -> None:
    before = _files(tmp_path)
    result = run(tiny_sd, *TINY, "--rank", "0.5", "--output", tmp_path / "nope" / "m.pt")
    assert_one_line_error(result, "does not exist")
    assert _files(tmp_path) == before


def test_output_folder_that_cannot_be_written(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    result = run(tiny_sd, *TINY, "--rank", "0.5", "--output", tmp_path / "m.pt")
    assert_one_line_error(result, "cannot write to folder", "Permission denied")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_read_only_output_folder(tiny_sd: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run(tiny_sd, *TINY, "--rank", "0.5", "--output", locked / "m.pt")
    assert_one_line_error(result, "cannot write to folder")


def test_output_equal_to_input(tiny_sd: Path) -> None:
    before = tiny_sd.read_bytes()
    result = run(tiny_sd, *TINY, "--rank", "0.5", "--output", tiny_sd)
    assert_one_line_error(result, "is the input file")
    assert tiny_sd.read_bytes() == before


def test_plan_with_conflicting_options(tiny_sd: Path, tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text("{}")
    result = run(tiny_sd, *TINY, "--plan", tmp_path / "plan.json", "--rank", "0.5")
    assert_one_line_error(result, "--plan", "--rank cannot be combined")


@pytest.mark.parametrize(
    ("text", "message"),
    [("not json", "not valid JSON"), ("[]", "not a decomp plan"), (None, "no such file")],
)
def test_bad_plan_file(tiny_sd: Path, tmp_path: Path, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / "plan.json").write_text(text)
    result = run(tiny_sd, *TINY, "--plan", tmp_path / "plan.json")
    assert_one_line_error(result, f"--plan {tmp_path / 'plan.json'}", message)


def test_plan_for_another_model(tiny_sd: Path, tmp_path: Path) -> None:
    plan = decomp.plan(tiny_net(width=8), "tucker", "ratio:0.5", (3, 16, 16))
    (tmp_path / "plan.json").write_text(plan.to_json())
    result = run(tiny_sd, *TINY, "--plan", tmp_path / "plan.json")
    message = "stem.0: the plan expects weight shape [8, 3, 3, 3]"
    assert_one_line_error(result, message)
    assert not tiny_sd.with_name("tiny_sd_tucker.pt").exists()


def test_failed_save_leaves_no_file(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    before = _files(tiny_sd.parent)
    result = run(tiny_sd, *TINY, "--rank", "0.5")
    assert_one_line_error(result, "No space left on device", quiet=False)  # after the plan table
    assert _files(tiny_sd.parent) == before


# --------------------------------------------------------------------- console scripts


def test_console_script_help() -> None:
    proc = subprocess.run([str(BIN / "decompose"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "--trust-pickle" in proc.stdout


def test_decomp_help_and_version() -> None:
    for args in (["--help"], ["decompose", "--help"], ["inspect", "--help"], ["export", "--help"]):
        result = decomp_cli(*args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.stdout
    assert decomp_cli("--version").stdout.strip() == f"decomp {decomp.__version__}"


def test_python_dash_m_decomp(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", ["decomp", "--version"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("decomp", run_name="__main__")
    assert info.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"decomp {decomp.__version__}"


def test_interrupt_leaves_no_file(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compression, "apply", interrupted)
    before = _files(tiny_sd.parent)
    result = run(tiny_sd, *TINY, "--rank", "0.5")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert _files(tiny_sd.parent) == before


def test_unexpected_errors_are_one_line_too(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise IndexError("list index out of range")

    monkeypatch.setattr(checkpoint, "load", broken)
    result = run(tiny_sd, *TINY, "--rank", "0.5")
    assert_one_line_error(result, "IndexError: list index out of range", "DECOMP_DEBUG=1")
    monkeypatch.setenv("DECOMP_DEBUG", "1")
    result = run(tiny_sd, *TINY, "--rank", "0.5")
    assert isinstance(result.exception, IndexError)  # the traceback, on request


def test_console_script_error_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "decompose"), str(tmp_path / "missing.pt")],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.pt'}: no such file; check the path"
    ]
    assert proc.stdout == ""


def test_library_state_is_restored(tiny_sd: Path) -> None:
    """A CLI call leaves the library's loggers as it found them."""
    import logging

    logger = logging.getLogger("decomp")
    level, handlers = logger.level, list(logger.handlers)
    run(tiny_sd, *TINY, "--dry-run", "-v")
    assert logger.level == level and logger.handlers == handlers


def test_the_layer_bar_shows_cp_sweeps_as_they_go() -> None:
    from decomp.cli.compress import PlanDisplay

    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 16, 3))
    p = decomp.plan(model, "cp", 4, (3, 12, 12), force=True)
    shown = PlanDisplay(json_output=True, dry_run=False)
    descriptions: list[str] = []
    with shown.stack:
        shown.plan(p)
        task = shown.bar.tasks[0]
        decomp.apply(
            model,
            p,
            progress=lambda name: (descriptions.append(task.description), shown.step(name)),
        )
    assert [d.split(",")[0] for d in descriptions] == ["cp: 0", "cp: 2"]
    assert all(", CP sweep " in d and ", error 0." in d for d in descriptions)
    assert task.completed == 2 and task.description == "cp: done"


def test_two_budgets_at_once_are_refused_in_the_options_words(tiny_sd: Path) -> None:
    result = run(tiny_sd, *TINY, "--target-macs", "0.5", "--target-latency", "0.5")
    assert_one_line_error(result, "give --target-macs or --target-latency, not both")
    assert _files(tiny_sd.parent) == {"tiny_sd.pt"}
