"""Smoke test of benchmarks/bench_quality.py: a --tiny run writes well-formed rows, report and plot.

The data is a tiny ImageFolder generated here (four classes of striped 32x32 images), so the test
never depends on an installed dataset. Times and F1 values are never asserted, only the structure
of what was written, and that a second run with the same settings reuses the rows.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import bench_quality as bq  # noqa: E402
from benchmarks.common import read_results  # noqa: E402

META_KEYS = {"config", "versions", "machine", "timestamp", "resume_key"}
SPLITS = {"train": 40, "val": 12, "test": 12}
CLASSES = 4


def make_image_folder(root: Path, seed: int = 0) -> Path:
    """root/{train,val,test}/class_k/*.png: class k has a bright band at height 8k, plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in SPLITS.items():
        for k in range(CLASSES):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.normal(60, 25, size=(32, 32, 3))
                image[8 * k : 8 * k + 6] += 150
                pixels = image.clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _finite_numbers(value: Any) -> list[float]:
    """Every int/float inside a JSON value (bools excluded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in _finite_numbers(item)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = make_image_folder(tmp_path_factory.mktemp("folder"))
    out = tmp_path_factory.mktemp("bench_quality")
    argv = ["--tiny", "--data", str(data), "--output", str(out)]
    assert bq.main(argv) == 0
    return {"argv": argv, "out": out, "result": read_results(out / "quality_tiny.json")}


def test_tiny_run_writes_rows_report_and_plot(tiny_run: dict[str, Any]) -> None:
    result, out = tiny_run["result"], tiny_run["out"]
    assert META_KEYS <= set(result["meta"]), set(result["meta"])
    assert result["meta"]["versions"]["torch"] and result["meta"]["cpu_seconds"] > 0
    rows = result["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), [r.get("note") for r in rows]
    for row in rows:
        missing = set(bq.ROW_KEYS) - set(row)
        assert not missing, (row["job"], missing)
        for key in bq.ROW_KEYS:
            if key in ("model", "method", "rank"):
                continue
            if key == "f1_before_finetune" and row["series"] in bq.STAGED_SERIES:
                assert row[key] is None  # a staged row has no single before-calibration F1
                continue
            assert isinstance(row[key], int | float), (row["job"], key, row[key])
        assert 0 <= row["f1"] <= 1 and row["macs"] < row["baseline_macs"], row["job"]
        assert row["cpu_s"] > 0 and row["load"], row["job"]
    assert all(math.isfinite(n) for n in _finite_numbers(result))
    assert {r["series"] for r in rows} == set(bq.SERIES)
    assert {r["method"] for r in rows if r["series"] == bq.SWEEP} == set(bq.METHODS)
    assert {r["finetune_epochs"] for r in rows if r["series"] not in bq.STAGED_SERIES} == {0, 1}
    assert any(r["rank"].startswith("target-macs:") for r in rows)
    fits = {r["series"]: r["fit"] for r in rows if r["series"] in bq.BUDGET_SERIES}
    assert fits == {bq.TARGET: "outputs", bq.TARGET_WEIGHTS: "weights", bq.RATIO_EQ: "outputs",
                    bq.VBMF_EQ: "outputs", bq.EVB_EQ: "outputs"}  # fmt: skip
    staged = {r["series"]: r for r in rows if r["series"] in bq.STAGED_SERIES}
    assert [len(staged[s]["stage_records"]) for s in bq.STAGED_SERIES] == [2, 1]
    assert staged[bq.STAGED]["finetune_epochs"] == staged[bq.SINGLE]["finetune_epochs"] == 2
    assert result["baselines"][0]["model"] == "small_cnn"
    md = (out / "quality_tiny.md").read_text()
    assert "## Summary" in md and "| small_cnn | sweep | tucker |" in md
    for heading in ("Multi-stage against single-stage", "Output-aware against weight-only"):
        assert f"## {heading}" in md
    assert "target-macs against uniform ratio and weakened vbmf / evb" in md
    assert any(r["rank"].startswith("evb:") for r in rows)
    assert "staged (2 x 1 ep)" in md and "CPU minutes in all" in md
    assert (out / "quality_tiny_pareto.png").stat().st_size > 0


def test_second_run_reuses_rows(tiny_run: dict[str, Any]) -> None:
    assert bq.main(tiny_run["argv"]) == 0
    again = read_results(tiny_run["out"] / "quality_tiny.json")
    before = {(r["job"], r["finetune_epochs"]): r["seconds"] for r in tiny_run["result"]["rows"]}
    after = {(r["job"], r["finetune_epochs"]): r["seconds"] for r in again["rows"]}
    assert before == after  # same rows, not recomputed (a recomputation has other timings)


def _row(**fields: Any) -> dict[str, Any]:
    base = {"model": "resnet18", "status": "ok", "series": bq.SWEEP, "method": "tucker"}
    base |= {"rank": "ratio:0.25", "finetune_epochs": 1, "baseline_f1": 0.92}
    base |= {"baseline_val_f1": 0.92}
    row = base | fields
    row["f1_drop_points"] = 100 * (row["baseline_f1"] - row["f1"])
    return row


def test_goal_line_chooses_by_validation_and_says_by_how_much() -> None:
    rows = [
        _row(macs_reduction=5.0, f1=0.912, val_f1=0.915),  # chosen: best validation F1
        _row(macs_reduction=4.5, f1=0.919, val_f1=0.905),  # better on test, never chosen
        _row(macs_reduction=2.0, f1=0.920, val_f1=0.921),
    ]
    line = bq.goal_line(rows, "resnet18", 4.0, 0.5)
    assert "not met**, by 0.30 points" in line and "5.00x" in line
    assert "met** with 0.70 points to spare" in bq.goal_line(rows, "resnet18", 4.0, 1.5)
    assert "missed** on MACs" in bq.goal_line(rows, "resnet18", 8.0, 1.5)


def test_budget_table_compares_at_equal_macs() -> None:
    common = {"budget": 0.25, "finetune_epochs": 0, "method": "auto"}
    rows = [
        _row(series=bq.TARGET, rank="target-macs:0.25", f1=0.91, macs=1000, **common),
        _row(series=bq.TARGET_WEIGHTS, rank="target-macs:0.25", f1=0.905, macs=998, **common),
        _row(series=bq.RATIO_EQ, rank="ratio:0.3", f1=0.90, macs=1010, **common),
        _row(series=bq.VBMF_EQ, rank="vbmf:0.7", f1=0.915, macs=950, **common),
    ]
    (entry,) = bq.budget_table(rows)
    assert entry["budget"] == "1/4"
    assert entry["margin_vs_ratio"] == pytest.approx(1.0)
    assert entry["margin_vs_weights"] == pytest.approx(0.5)
    assert "loses to vbmf by 0.50 (MACs not matched: -5.0%; not counted)" in entry["verdict"]
    assert "beats every matched one in 1 of 1" in bq.budget_lines([entry])[0]
    (line,) = bq.fit_lines([entry])
    assert "does not hold" in line and "higher everywhere" in line  # no 1-epoch entry


def test_staged_table_compares_at_equal_epochs() -> None:
    common = {"budget": 0.1, "budget_label": "1/10", "finetune_epochs": 3}
    rows = [
        _row(series=bq.STAGED, stages=3, epochs_per_stage=1, f1=0.915, val_f1=0.918,
             macs=100, macs_reduction=10.1, **common),
        _row(series=bq.SINGLE, stages=1, epochs_per_stage=3, f1=0.91, val_f1=0.911,
             macs=99, macs_reduction=10.2, **common),
    ]  # fmt: skip
    (entry,) = bq.staged_table(rows)
    assert entry["margin"] == pytest.approx(0.5) and entry["val_margin"] == pytest.approx(0.7)
    (line,) = bq.staged_lines([entry])
    assert "staged (3 x 1 ep) beats single stage by 0.50 (1 x 3 ep)" in line


def test_frontier_keeps_the_points_nothing_beats() -> None:
    points = [(4.0, 0.90), (1.0, 0.80), (2.0, 0.85), (3.0, 0.84), (5.0, 0.89)]
    assert bq.frontier(points) == [(1.0, 0.80), (2.0, 0.85), (4.0, 0.90)]


def test_tune_to_macs_bisects_to_the_target() -> None:
    def make(x: float) -> SimpleNamespace:  # MACs that rise with the parameter, in steps
        return SimpleNamespace(macs_after=int(1000 * math.ceil(64 * x) / 64))

    found = bq.tune_to_macs(make, 1e-3, 1.0, 400, rising=True, tolerance=0.02, max_iter=16)
    assert abs(found["deviation"]) <= 0.02 and found["iterations"] <= 16
    falling = bq.tune_to_macs(
        lambda x: make(1 - x), 0.0, 1.0, 400, rising=False, tolerance=0.02, max_iter=16
    )
    assert abs(falling["deviation"]) <= 0.02
