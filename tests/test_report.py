"""benchmarks/report.py: the README's results section from small fake results files.

Every file lives in ``tmp_path``: the real README and results are never read or written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import bench_cp, report  # noqa: E402
from benchmarks.common import write_results, write_text  # noqa: E402

MACHINE = {
    "cpu": "Fake CPU 9000",
    "cpus_usable": 2,
    "torch_threads": 2,
    "cuda_available": False,
    "device_name": "Fake CPU 9000",
    "load_average": [0.5, 0.25, 0.125],
}
META = {"config": {}, "machine": MACHINE, "timestamp": "2030-01-02T03:04:05+00:00"}
BEFORE = "# Title\n\nIntro text  \r\nwith odd spacing.\n\n## Results measured here\n\n"
AFTER = "\n## Command line\n\nMore text, no final newline."
README_TEXT = f"{BEFORE}{report.BEGIN}\nhand-typed table\n{report.END}\n{AFTER}"


def _demo() -> dict[str, Any]:
    sizes = {"macs": 14_000_000, "macs_competition": 13_900_000, "params": 3_300_000}
    return {
        "status": "done",
        "config": {
            "arch": "torchvision.models:resnet18",
            "epochs": 12,
            "finetune_epochs": 2,
            "method": "tucker",
            "rank": "vbmf:0.6",
            "calibration_batches": 30,
        },
        "machine": {"platform": "Linux", "cpu_count": 2, "torch_threads": 1, "cuda": None},
        "timings": {"total": 600.0},
        "baseline": {
            "f1": 0.9240,
            "macs": 37_220_352,
            "macs_competition": 37_134_858,
            "params": 11_181_642,
            "competition_score": 2.6248,
        },
        "decomposed": {
            **sizes,
            "f1": 0.9196,
            "f1_before_calibration": 0.9185,
            "competition_score": 0.9702,
            "calibration_batches": 30,
        },
        "finetuned": {**sizes, "f1": 0.9255, "competition_score": 0.9667},
        "summary": {
            "macs_ratio": 0.4,
            "params_ratio": 0.25,
            "f1_drop_after_finetune": -0.0015,
            "targets": {"macs_at_most_half": True, "f1_drop_at_most_1_point": False},
        },
    }


def _tucker_summary() -> dict[str, Any]:
    methods = [
        {"method": "decomp", "total_s": 2.5, "time_vs_decomp": 1.0},
        {"method": "tensorly", "total_s": 17.75, "time_vs_decomp": 7.1},
    ]
    for m in methods:
        m |= {"total_median_s": m["total_s"], "mean_rel_error": 0.7321, "max_rel_error": 0.7333}
    return {
        "methods": methods,
        "n_layers": 16,
        "speedup_vs_tensorly": 7.1,
        "speedup_vs_tltorch": 8.2,
        "decomp_vs_floor": 7.8,
        "target_speedup": 5.0,
        "error_slack": 1e-6,
        "error_no_worse": True,
        "max_error_gap_vs_tensorly": -2.5e-5,
        "meets_target": True,
    }


def _speed_rows() -> list[dict[str, Any]]:
    row = {
        "model": "resnet18",
        "method": "tucker",
        "status": "ok",
        "decompose_s": 3.21,
        "peak_delta_mb": 123.0,
        "macs_reduction": 4.56,
        "latency_speedup_b1": 2.34,
        "latency_speedup_b64": 3.45,
        "latency_efficiency_b1": 0.513,
        "latency_efficiency_b64": 0.757,
        "meets_latency_goal": False,
        "note": None,
    }
    original = {"model": "resnet18", "method": "original", "status": "ok", "macs": 1}
    return [original, row]


def _quality_rows() -> list[dict[str, Any]]:
    base = {"model": "resnet18", "status": "ok", "baseline_val_f1": 0.925, "budget": None}
    sweep = {
        **base,
        "series": "sweep",
        "method": "tucker",
        "rank": "vbmf",
        "finetune_epochs": 1,
        "macs": 3_000_000,
        "macs_reduction": 11.77,
        "f1": 0.9132,
        "val_f1": 0.9156,
        "f1_drop_points": 1.07,
    }
    budget = {**sweep, "method": "auto", "budget": 0.125, "macs": 4_000_000}
    target = {**budget, "series": "target-macs", "rank": "target-macs:0.125", "f1": 0.9111}
    ratio = {**budget, "series": "ratio@equal-macs", "rank": "ratio:0.3", "f1": 0.9011}
    vbmf = {**budget, "series": "vbmf@equal-macs", "rank": "vbmf:0.4", "f1": 0.9061}
    return [sweep, target, ratio, vbmf]


def _cp_rows(gap: float = -0.002) -> list[dict[str, Any]]:
    """resnet18 only: two compared layers (the second's error ``gap`` relative to tensorly's)
    and one skipped at rank 0."""
    rows = []
    for layer, (d_s, t_s, err) in {
        "conv1": (0.5, 10.0, 0.9),
        "layer4.0.conv2": (2.0, 110.0, 0.93),
    }.items():
        d_err = err * (1 + (gap if layer != "conv1" else -0.001))
        rows.append(
            {
                "model": "resnet18", "layer": layer, "shape": [64, 64, 3, 3], "spec": "ratio:0.3",
                "rank": 20, "status": "ok", "decomp_s": d_s, "tensorly_s": t_s,
                "decomp_err": d_err, "tensorly_err": err, "err_gap_rel": d_err / err - 1,
                "decomp_peak_mb": 80.0, "tensorly_peak_mb": 1100.0,
                "timestamp": f"2030-01-02T0{len(rows) + 1}:00:00Z",
            }
        )  # fmt: skip
    skipped = {"model": "resnet18", "layer": "conv1", "spec": "vbmf", "rank": 0}
    return [*rows, {**skipped, "status": "skipped", "note": "vbmf gives rank 0"}]


def _cp(gap: float = -0.002) -> dict[str, Any]:
    """A partial cp_speed.json: resnet18 only, memory measured, no CLI or thread section."""
    rows = _cp_rows(gap)
    memory = {
        "model": "resnet18", "rank": "ratio:0.3", "status": "ok", "decompose_s": 15.25,
        "n_factorized": 17, "peak_delta_mb": 121.8, "under_limit": True,
    }  # fmt: skip
    summary = bench_cp.summarize(rows, ["resnet18"], ["ratio:0.3", "vbmf"])
    meta = {**META, "config": {"quick": False}}
    return {"meta": meta, "rows": rows, "summary": summary, "memory": memory, "cli": None}


def _latency_rows() -> list[dict[str, Any]]:
    row = {
        "model": "resnet18", "runtime": "onnxruntime", "batch": 1, "threads": 1, "target": 0.5,
        "status": "ok", "landing": 0.93, "speedup": 2.1, "macs_cut": 1.4, "efficiency": 1.5,
        "eager_speedup": 1.9, "eager_efficiency": 1.36,
    }  # fmt: skip
    off = {**row, "target": 0.25, "landing": 0.8, "speedup": 4.0, "macs_cut": 5.0}
    off |= {"efficiency": 0.8, "eager_efficiency": 0.5}
    low = {"model": "vgg16", "runtime": "torch", "batch": 64, "threads": 1, "target": 0.25}
    low |= {"status": "infeasible", "message": "below the floor of 150 ms (0.49 of it)"}
    return [row, off, low]


def _pretrained_rows() -> list[dict[str, Any]]:
    base = {"case": "mtcnn_onet", "images": 20, "majority_share": 0.5}
    rows = [{**base, "variant": "original", "rank": None, "target_macs": 1.0}]
    for target, weights, outputs in ((0.5, 0.8, 0.9), (0.25, 0.95, 0.6)):
        for variant, agreement in (("weights", weights), ("outputs", outputs)):
            rows.append(
                {
                    **base, "variant": variant, "rank": f"target-macs:{target}",
                    "target_macs": target, "top1_agreement": agreement,
                    "output_tv": 1 - agreement, "macs_thop_ratio": target - 0.01,
                }
            )  # fmt: skip
    error = "BudgetError: too small (every eligible layer at rank 1); ask for more"
    rows += [
        {**base, "variant": v, "rank": "target-macs:0.1", "target_macs": 0.1, "error": error}
        for v in ("weights", "outputs")
    ]
    rows.append({**base, "variant": "weights", "rank": "vbmf", "target_macs": None})
    return rows


ALL = ("demo", "tucker", "cp", "speed", "latency", "quality", "pretrained")


def write_fakes(results: Path, names: tuple[str, ...] = ALL):
    """The fake results files named by ``names`` in ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    if "demo" in names:  # the demo writes its own format, not write_results'
        import json

        write_text(results / "demo.json", json.dumps(_demo()))
    if "tucker" in names:
        write_results(
            results / "tucker_speed.json", META, [], summary=_tucker_summary(), notes=["n"]
        )
        write_text(results / "tucker_speed.md", "# full report\n")
    if "speed" in names:
        meta = {**META, "config": {"batch_sizes": [1, 64]}, "latency_goal": 0.75}
        write_results(results / "speed.json", meta, _speed_rows())
    if "quality" in names:
        baseline = {"model": "resnet18", "f1": 0.9240, "macs": 37_220_352, "source": "trained"}
        write_results(results / "quality.json", META, _quality_rows(), baselines=[baseline])
        write_text(results / "quality_pareto.png", "not really a png")
    if "cp" in names:
        cp = _cp()
        write_results(results / "cp_speed.json", cp.pop("meta"), cp.pop("rows"), **cp)
        write_text(results / "cp_speed.md", "# full report\n")
    if "latency" in names:
        meta = {**META, "efficiency_goal": 0.85}
        write_results(results / "latency.json", meta, _latency_rows(), f1=[], alignment=[])
    if "pretrained" in names:
        write_results(results / "pretrained.json", META, _pretrained_rows(), evbmf=[])


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """tmp_path/README.md with markers and an empty tmp_path/benchmarks/results."""
    readme = tmp_path / "README.md"
    readme.write_bytes(README_TEXT.encode())
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    return {"readme": readme, "results": results}


def test_section_shows_the_numbers_of_every_file(tree: dict[str, Path]) -> None:
    write_fakes(tree["results"])
    text = report.render_section(tree["results"], tree["readme"])
    assert "not run yet" not in text
    # demo: the table rows, the summary sentence, the targets, provenance
    assert "| resnet18 baseline, 12 epochs | 0.9240 | 37,220,352 | 37,134,858 |" in text
    assert "Tucker-2, `vbmf:0.6`, before BN calibration | 0.9185" in text
    assert "after BN calibration (30 batches, no training) | 0.9196" in text
    assert "after 2 epochs of distillation | 0.9255 |" in text
    assert "2.5x fewer MACs and 4.0x fewer parameters" in text
    assert "0.15 points *above* the baseline" in text
    assert "F1 drop at most 1 point: **not met**" in text
    assert "[`benchmarks/results/demo.json`](benchmarks/results/demo.json)" in text
    assert "not recorded: date, CPU model, load" in text
    # tucker: totals, ratio, verdict, provenance and the link to the full report
    assert "| tensorly | 17.750 | 7.10 | 0.73210 | 0.73330 |" in text
    assert "decomp is 7.10x faster than tensorly and 8.20x faster than tltorch" in text
    assert "2030-01-02 03:04 UTC on Fake CPU 9000, 2 CPUs, 2 torch threads" in text
    assert "load 0.5 / 0.25 / 0.125" in text
    assert "[`tucker_speed.md`](benchmarks/results/tucker_speed.md)" in text
    # speed: one row per model x method (not the original), efficiencies, the goal line
    assert "| resnet18 | tucker | ok | 3.21 | 123 | 4.56 | 2.34 | 3.45 | 0.51 | 0.76 | no |" in text
    assert "| original |" not in text
    assert ">= 0.75 at batch 1 and 64; met by 0 of 1 rows" in text
    # quality: baseline, goal lines, budget table and the plot
    assert "| resnet18 | 0.9240 |" in text
    goal = "**resnet18, >= 10x fewer MACs at <= 0.5 point(s) of macro F1 lost: not met**, by 0.57"
    assert goal in text and "20x fewer MACs at <= 1.5 point(s) of macro F1 lost: missed**" in text
    assert "beats every matched one in 1 of 1**" in text
    assert "| resnet18 | 1/8 | 1 | 4,000,000 | 0.9111 |" in text
    assert "![macro F1 against MACs](benchmarks/results/quality_pareto.png)" in text
    assert str(tree["results"]) not in text  # links are relative to the README


def test_missing_files_give_not_run_lines(tree: dict[str, Path]) -> None:
    write_fakes(tree["results"], names=("tucker",))
    text = report.render_section(tree["results"], tree["readme"])
    for target in ("demo", "bench-speed", "bench-quality", "bench-cp", "bench-latency"):
        assert f"\nnot run yet: `make {target}`\n" in text
    assert "\nnot run yet: `make bench-pretrained`\n" in text
    assert "not run yet: `make bench-tucker`" not in text
    empty = report.render_section(tree["results"] / "nothing", tree["readme"])
    assert empty.count("not run yet: `make ") == len(report.SECTIONS)


def test_sections_come_in_readme_order(tree: dict[str, Path]) -> None:
    text = report.render_section(tree["results"], tree["readme"])
    targets = [f"(`make {target}`)" for _, _, target, _ in report.SECTIONS]
    assert [t for _, _, t, _ in report.SECTIONS] == [
        "demo", "bench-tucker", "bench-cp", "bench-speed", "bench-latency", "bench-quality",
        "bench-pretrained",
    ]  # fmt: skip
    assert [text.index(t) for t in targets] == sorted(text.index(t) for t in targets)


def test_cp_section_gives_totals_verdict_limits_and_what_is_missing(
    tree: dict[str, Path],
) -> None:
    write_fakes(tree["results"], names=("cp",))
    text = report.render_section(tree["results"], tree["readme"])
    # one row per model (all specs) and the overall row, no per-layer rows
    assert (
        "| resnet18 | 2 | 1 | 0 | 2.5 | 120 | 48 | -0.151% | -0.100% | 80 | 1100 | True |" in text
    )
    assert "| all | 2 | 1 | 0 |" in text and "layer4.0.conv2" not in text
    assert "2 layer fits compared, 1 skipped at rank 0 (vbmf)" in text
    assert "rows written 2030-01-02 01:00 to 02:00 UTC" in text
    assert "[`cp_speed.md`](benchmarks/results/cp_speed.md)" in text
    assert "Overall: decomp 48x faster than tensorly's parafac over 2 layers" in text
    assert "(allowed +0.5%)" in text and "(allowed +1%); target 10x: met." in text
    assert "adds 122 MiB at peak; limit < 300 MiB: met" in text
    assert "The `decompose` command: not timed yet." in text
    missing = "Not in this file yet: resnet50 (no layer measured); vgg16 (no layer measured); "
    assert missing + "the thread-policy timings." in text
    # a layer 2% worse than tensorly's fails the 1% per-layer slack
    ctx = report.Context(tree["results"], tree["readme"])
    worse = "\n".join(report.cp_section(_cp(gap=0.02), ctx))
    assert "worst layer +2.000% (allowed +1%); target 10x: NOT met." in worse
    assert "| False |" in worse


def test_latency_section_gives_landing_efficiency_floor_and_missing_rows(
    tree: dict[str, Path],
) -> None:
    write_fakes(tree["results"], names=("latency",))
    text = report.render_section(tree["results"], tree["readme"])
    assert "2 planned rows, 1 below the floor, 0 F1 rows" in text
    head = "| runtime | batch | target | models | landed in 0.85-1.0 | measured / target |"
    assert head in text
    assert (
        "| onnxruntime | 1 | 0.5 | 1 | 1 | 0.93-0.93 | 2.10x | 1.40x | 1.50 | 1.50 | 1.36 | 0 |"
        in text
    )
    assert "| torch | 64 | 0.25 | 0 | - | - | - | - | - | - | - | 1 |" in text
    landing = "inside 0.85-1.0: 1 of 2 rows; outside: resnet18 onnxruntime b1 at 0.25 (0.800)"
    assert landing in text and "(below 0.85: faster than asked; above 1.0: slower)" in text
    assert "under onnxruntime at target 0.5): met by 1 of 1 rows." in text
    assert "- Below the floor (no plan): vgg16 torch b64 at 0.25." in text
    assert "- F1 at equal measured latency: no rows yet." in text
    missing = text.split("Not in this file yet: ")[1].split("\n")[0]
    assert missing.startswith("resnet18 onnxruntime b64 at 0.5, 0.25; resnet18 torch b1 at")
    assert "vgg16 torch b64 at 0.5;" in missing and missing.endswith("; the F1 comparison.")
    assert "; resnet18 onnxruntime b1" not in "; " + missing


def test_latency_f1_line_compares_the_budgets() -> None:
    side = {"test_f1": 0.9030, "measured_ratio": 0.518}
    f1 = [
        {"target": 0.5, "runtime": "onnxruntime", "batch": 1, "status": "ok", "latency": side,
         "macs": {"test_f1": 0.9014, "measured_ratio": 0.499}},
        {"target": 0.25, "status": "infeasible"},
    ]  # fmt: skip
    line = report.bench_latency.f1_line({"f1": f1, "f1_baseline": {"f1": 0.9082}})
    assert line.startswith("- F1 at equal measured latency (demo resnet18, onnxruntime batch 1;")
    assert "baseline test F1 0.9082): target 0.5: latency budget 0.9030 against MACs" in line
    assert "budget 0.9014 (+0.16 points; fine-tuned, they measure 0.518 and 0.499" in line
    assert line.endswith("; target 0.25: infeasible.")


def test_pretrained_section_compares_the_fits_per_target(tree: dict[str, Path]) -> None:
    write_fakes(tree["results"], names=("pretrained",))
    text = report.render_section(tree["results"], tree["readme"])
    assert "mtcnn_onet (20 images)" in text
    assert "| case | MACs target | thop after/before (weights) | agreement, weights |" in text
    assert "| mtcnn_onet | 0.5 | 0.490 | 0.800 | 0.900 | 0.500 | 0.200 | 0.100 | - |" in text
    assert "| mtcnn_onet | 0.1 | - | - | - | 0.500 | - | - | BudgetError: too small |" in text
    assert "| vbmf |" not in text and "| original |" not in text  # targets only
    line = text.split("- mtcnn_onet ")[1].split("\n")[0]
    assert line.startswith("(a constant answer agrees on 0.500): `outputs` against `weights`")
    assert "higher at 0.5 (0.900 against 0.800); lower at 0.25 (0.600 against 0.950)" in line
    assert "output TV lower at 1 of 2 targets. At or below the constant answer: 0 of 4 rows" in line
    assert line.endswith("No plan at 0.1 (BudgetError: too small).")
    assert "Not in this file yet: efficientnet_lite0." in text


def test_empty_new_results_files_render_without_crashing(tree: dict[str, Path]) -> None:
    results = tree["results"]
    write_results(results / "cp_speed.json", META, [], summary=[], memory=None, cli=None)
    write_results(results / "latency.json", META, [], f1=[], alignment=[])
    write_results(results / "pretrained.json", META, [], evbmf=[])
    text = report.render_section(results, tree["readme"])
    assert "No layer compared yet." in text and "Overall: no layer compared yet." in text
    assert "Memory: CP over resnet18 not measured yet. The `decompose` command: not timed" in text
    assert "resnet18 (no layer measured); resnet50 (no layer measured); vgg16" in text
    assert "No rows yet." in text and "no onnxruntime row at target 0.5 yet" in text
    assert "demo_resnet18 torch b64 at 0.5, 0.25" in text
    assert "No compressed rows yet." in text
    assert "Not in this file yet: mtcnn_onet; efficientnet_lite0." in text


def test_replacement_keeps_the_rest_byte_identical(tree: dict[str, Path]) -> None:
    write_fakes(tree["results"])
    readme = tree["readme"]
    assert report.update_readme(readme, tree["results"]) is True
    new = readme.read_bytes().decode()
    head = f"{BEFORE}{report.BEGIN}\n"
    tail = f"{report.END}\n{AFTER}"
    assert new.startswith(head) and new.endswith(tail)
    body = new[len(head) : -len(tail)]
    assert "hand-typed table" not in body
    assert body == "\n" + report.render_section(tree["results"], readme) + "\n"
    assert report.update_readme(readme, tree["results"]) is False  # stable: nothing to rewrite
    assert readme.read_bytes().decode() == new


def test_check_detects_drift(tree: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--results", str(tree["results"]), "--readme", str(tree["readme"])]
    write_fakes(tree["results"], names=("demo",))
    assert report.main(["--check", *args]) == 1
    message = capsys.readouterr().err
    assert "out of date" in message and "make report" in message
    assert message.count("\n") == 1
    assert tree["readme"].read_bytes().decode() == README_TEXT  # --check writes nothing
    assert report.main(args) == 0
    assert report.main(["--check", *args]) == 0
    write_fakes(tree["results"], names=("speed",))  # a new results file: the README is stale
    assert report.main(["--check", *args]) == 1


@pytest.mark.parametrize(
    "text",
    [
        "# no markers at all\n",
        f"{report.BEGIN}\nonly the beginning\n",
        f"{report.END}\n{report.BEGIN}\n",
        f"{report.BEGIN}\n{report.END}\n{report.BEGIN}\n{report.END}\n",
    ],
)
def test_readme_without_markers_is_a_clear_error(
    tree: dict[str, Path], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tree["readme"].write_text(text)
    with pytest.raises(report.MarkerError, match="results:begin"):
        report.update_readme(tree["readme"], tree["results"])
    args = ["--results", str(tree["results"]), "--readme", str(tree["readme"])]
    assert report.main(args) == 2
    assert "needs one line <!-- results:begin -->" in capsys.readouterr().err
    assert tree["readme"].read_text() == text


def test_demo_section_names_a_macs_budget_and_a_reused_baseline(tree: dict[str, Path]) -> None:
    demo = _demo()
    demo["config"]["target_macs"] = 0.5
    demo["baseline"]["reused"] = True
    text = "\n".join(report.demo_section(demo, report.Context(tree["results"], tree["readme"])))
    assert "| Tucker-2, MACs budget 0.5, before BN calibration | 0.9185" in text
    assert "total wall time 10.0 min (baseline reused from an earlier run)" in text
