"""Smoke test of the benchmark scripts: --tiny runs write well-formed JSON, markdown and a plot.

Both scripts run in this process through their ``main(argv)`` (bench_speed's measurements run in
child processes of its own); times are never asserted, only the structure of what was written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import bench_speed, bench_tucker  # noqa: E402
from benchmarks.common import read_results  # noqa: E402

META_KEYS = {"config", "versions", "machine", "timestamp"}
VERSION_KEYS = {"torch", "tensorly", "tltorch", "decomp"}
MACHINE_KEYS = {"platform", "cpu_count", "torch_threads", "device_name"}


def _numbers(value: Any) -> list[float]:
    """Every int/float inside a JSON value (bools excluded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in _numbers(item)]


def _check_meta(meta: dict[str, Any]) -> None:
    assert META_KEYS <= set(meta), set(meta)
    assert VERSION_KEYS <= set(meta["versions"]), meta["versions"]
    assert MACHINE_KEYS <= set(meta["machine"]), meta["machine"]
    assert meta["versions"]["torch"]


@pytest.fixture(scope="module")
def tucker_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench_tucker")
    assert bench_tucker.main(["--tiny", "--output", str(out)]) == 0
    return read_results(out / "tucker_speed_tiny.json"), out


@pytest.fixture(scope="module")
def speed_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench_speed")
    assert bench_speed.main(["--tiny", "--output", str(out)]) == 0
    return read_results(out / "speed_tiny.json"), out


def test_bench_tucker_tiny(tucker_result: tuple[dict[str, Any], Path]) -> None:
    result, out = tucker_result
    _check_meta(result["meta"])
    rows = result["rows"]
    assert len(rows) == len(bench_tucker.tiny_cases())
    for row in rows:
        for method in bench_tucker.METHODS:
            assert row[f"{method}_s"] >= 0
        for key in ("decomp_err", "tensorly_err", "tltorch_err", "hosvd_err"):
            assert 0 <= row[key] < 1, (row["layer"], key, row[key])
        # the same rank for every method: the approximations are comparable
        assert abs(row["decomp_err"] - row["tltorch_err"]) < 0.05
    summary = result["summary"]
    for key in ("speedup_vs_tensorly", "speedup_vs_tltorch", "decomp_vs_floor"):
        assert summary[key] > 0
    assert isinstance(summary["error_no_worse"], bool)
    assert all(math.isfinite(n) for n in _numbers(result))
    md = (out / "tucker_speed_tiny.md").read_text()
    assert "| decomp |" in md and "speed" in md


def test_bench_speed_tiny(speed_result: tuple[dict[str, Any], Path]) -> None:
    result, out = speed_result
    _check_meta(result["meta"])
    rows = result["rows"]
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"original", *bench_speed.METHODS}
    for row in rows:
        assert set(bench_speed.ROW_KEYS) <= set(row), set(bench_speed.ROW_KEYS) - set(row)
        assert row["status"] in ("ok", "skipped"), (row["method"], row.get("error"))
    original = by_method["original"]
    assert original["status"] == "ok" and original["macs"] > 0 and original["params"] > 0
    for method in bench_speed.METHODS:
        row = by_method[method]
        if row["status"] != "ok":
            continue
        assert row["decompose_s"] > 0 and row["peak_delta_mb"] >= 0
        assert row["macs_before"] == original["macs"]
        if row["n_factorized"]:
            assert row["macs"] < row["macs_before"]
            assert row["latency_speedup_b1"] > 0
    for section in ("tucker_compare", "cp_compare", "slow_layers", "layer_timings", "notes"):
        assert section in result
    assert result["tucker_compare"] and result["tucker_compare"][0]["status"] == "ok"
    assert all(math.isfinite(n) for n in _numbers(result))
    md = (out / "speed_tiny.md").read_text()
    assert "| tiny_cnn | original |" in md
    assert (out / "speed_tiny_latency_vs_macs.png").stat().st_size > 0
