"""``decomp compress`` on tiny data: stages, files and JSON; resuming; exit codes and one-line
errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import decomp
from decomp.checkpoint import save
from decomp.cli import app
from tests.conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (3, 16, 16)
KWARGS = {"width": 32, "num_classes": 4}
runner = CliRunner()


def run(*args: Any) -> Result:
    result = runner.invoke(app, ["compress", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "base.pt"
    arch = {"factory": "tests.conftest:tiny_net", "kwargs": KWARGS}
    save(tiny_net(**KWARGS), path, arch=arch, input_size=SIZE)
    return path


def test_two_stages_write_every_file_and_report(model: Path, digits: Path, tmp_path: Path):
    out = tmp_path / "small.pt"
    args = (model, "--data", digits, "--target-macs", "0.3", "--stages", "2", "-o", out)
    result = run(*args, "--epochs-per-stage", "1", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["finished"] and record["output"] == str(out) and len(record["stages"]) == 2
    assert record["settings"]["model"] == str(model.resolve())
    assert [s["stage"] for s in record["stages"]] == [1, 2]
    assert (tmp_path / "small.stage1.pt").exists() and Path(f"{out}.stages.json").exists()
    macs = decomp.count_macs(decomp.load(out), SIZE)
    assert macs == record["stages"][-1]["macs"] <= 0.3 * record["original"]["macs"]
    again = run(*args, "--resume")  # a finished run: nothing left to do, the table again
    assert again.exit_code == 0, again.output
    assert "stage by stage" in again.stdout and "2/2" in again.stdout
    assert f"wrote {out}" in again.stdout and "resumed from" in again.stdout
    one_line_error(run(*args), "holds a staged run already", "--resume")


def test_text_output_shows_each_stage_as_it_ends(model: Path, digits: Path, tmp_path: Path):
    out = tmp_path / "small.pt"
    result = run(
        model, "--data", digits, "--target-macs", "0.5", "--stages", "1",
        "--epochs-per-stage", "0", "-o", out, "--fit", "weights",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stage 1:" in result.stdout and "MACs" in result.stdout
    assert "x fewer); test F1" in result.stdout
    state = json.loads(Path(f"{out}.stages.json").read_text())
    assert state["settings"]["fit"] == "weights" and state["status"] == "done"


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--target-macs", "lots"], ("bad MACs target 'lots'",)),
        (["--target-macs", "10G"], ("exceed the model's",)),
        (["--target-macs", "0.3", "--resume"], ("nothing to resume: no state at",)),
    ],
)
def test_bad_input_is_one_line(
    model: Path, digits: Path, tmp_path: Path, extra: list[str], fragments: tuple[str, ...]
):
    out = tmp_path / "x.pt"
    one_line_error(run(model, "--data", digits, "-o", out, *extra), *fragments)
    assert not out.exists()


def test_missing_files_are_one_line(model: Path, digits: Path, tmp_path: Path):
    base = ["--data", digits, "--target-macs", "0.3", "-o", tmp_path / "x.pt"]
    one_line_error(run(tmp_path / "nothing.pt", *base), "nothing.pt")
    one_line_error(run(model, *base, "--teacher", tmp_path / "no_teacher.pt"), "no_teacher.pt")


@pytest.mark.parametrize(
    "extra",
    [
        ["--stages", "0", "--target-macs", "0.3"],
        ["--epochs-per-stage", "-1", "--target-macs", "0.3"],
        ["--target-macs", "0.3", "--fit", "kernels"],
        ["--target-macs", "0.3", "--method", "nope"],
    ],
)
def test_malformed_command_lines_exit_2(model: Path, digits: Path, extra: list[str]):
    assert run(model, "--data", digits, *extra).exit_code == 2


def test_data_and_target_are_required(model: Path, digits: Path):
    assert run(model, "--target-macs", "0.3").exit_code == 2
    assert run(model, "--data", digits).exit_code == 2


def test_preprocessing_and_validation_options_reach_the_workflow(
    model: Path, digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import decomp.cli.staged as cli_staged
    from decomp.data import Preprocessing

    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise ValueError("stopped here")

    monkeypatch.setattr(cli_staged, "compress_in_stages", fake)
    result = run(
        model, "--data", digits, "--target-macs", "0.5", "-o", tmp_path / "s.pt",
        "--mean", "0.5", "--std", "0.25", "--val-split", "40",
    )  # fmt: skip
    one_line_error(result, "stopped here")
    assert seen["preprocessing"] == Preprocessing(mean=(0.5,), std=(0.25,))
    assert seen["val_split"] == 40 and isinstance(seen["val_split"], int)
