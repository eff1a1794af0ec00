"""Latency tables, the latency budget and paired timing (tiny models, no timing asserts)."""

import pytest
import torch
from torch import nn

import decomp
from decomp import latency, timing
from decomp.factorize import registry
from decomp.factorize.registry import Call, RankGrid
from decomp.latency import LatencyTable
from decomp.plan import Skip, candidate_calls
from decomp.plan.budget import GRID
from decomp.timing import Key
from tests.conftest import tiny_net

SIZE = (3, 16, 16)


def key(runtime: str = "torch", batch: int = 1) -> Key:
    return Key.current(runtime, "cpu", batch, 1)


def hand_table(
    model: nn.Module, slow: str | None = None, baseline: float = 10.0, threads: int | None = 1
) -> LatencyTable:
    """A table made up by hand: every layer 1 ms dense; factorized, 0.2 ms at the lowest
    measured ranks rising to 1.5 ms at full rank, except ``slow`` (2 ms at every rank)."""
    table = LatencyTable(Key.current("torch", "cpu", 1, threads))
    for c, calls in candidate_calls(model, "auto", SIZE):
        grid = latency.snapped_grid(c.method.grid(c.layer, GRID), latency.align_for("torch", 1))
        ranks = latency.measured_ranks(grid)
        times = [0.2 + 1.3 * i / max(len(ranks) - 1, 1) for i in range(len(ranks))]
        if c.lp.name == slow:
            times = [2.0] * len(ranks)
        for call in calls:
            table.add_layer(c.layer, c.method, call, 1.0, list(zip(ranks, times, strict=True)))
    table.set_baseline(model, SIZE, baseline)
    return table


@pytest.fixture
def model() -> nn.Module:
    return tiny_net(width=64).eval()


def test_table_round_trips_and_is_refused_for_another_key(model, tmp_path):
    table = hand_table(model)
    path = table.save(tmp_path / "table.json")
    again = LatencyTable.load(path, key())
    assert again.to_dict() == table.to_dict()
    assert again.baseline_ms(model, SIZE) == 10.0
    with pytest.raises(ValueError, match="measured for torch on cpu, batch 1.*not onnxruntime"):
        LatencyTable.load(path, key("onnxruntime"))
    with pytest.raises(ValueError, match="batch 64"):
        LatencyTable.load(path, key(batch=64))
    with pytest.raises(ValueError, match="batch 64"):
        decomp.plan(
            model,
            "auto",
            input_size=SIZE,
            target_latency=0.5,
            batch=64,
            threads=1,
            latency_table=path,
        )
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a decomp latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_interpolation_is_linear_in_macs_and_held_at_the_ends():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    tucker, call = registry.get("tucker"), Call((1, 64, 8, 8), (1, 64, 8, 8))
    table = LatencyTable(key())
    table.add_layer(conv, tucker, call, 1.0, [([16, 16], 0.2), ([48, 48], 0.6)])
    macs = [tucker.costs(conv, [r, r], [call])[0] for r in (16, 32, 48)]
    middle = 0.2 + 0.4 * (macs[1] - macs[0]) / (macs[2] - macs[0])
    assert table.layer_ms(conv, tucker, [32, 32], [call]) == pytest.approx(middle)
    assert table.layer_ms(conv, tucker, [8, 8], [call]) == pytest.approx(0.2)
    assert table.layer_ms(conv, tucker, [64, 64], [call, call]) == pytest.approx(1.2)
    assert table.dense_ms(conv, tucker, [call, call]) == 2.0
    with pytest.raises(KeyError, match="no latency measured"):
        table.dense_ms(conv, tucker, [Call((1, 64, 4, 4), (1, 64, 4, 4))])


def test_snapped_grid_gives_multiples_up_to_the_largest_rank():
    grid = RankGrid(20, lambda k: [k * 3, k])  # top ranks (60, 20)
    snapped = latency.snapped_grid(grid, 8)
    all_ranks = [snapped.ranks(k) for k in range(1, snapped.steps + 1)]
    assert all(
        r % 8 == 0 or r == top for rs in all_ranks for r, top in zip(rs, (60, 20), strict=True)
    )
    assert all_ranks[-1] == [60, 20] and len(set(map(tuple, all_ranks))) == len(all_ranks)
    assert latency.snapped_grid(grid, 1) is grid
    measured = latency.measured_ranks(snapped, 4)
    assert measured[0] == all_ranks[0] and measured[-1] == all_ranks[-1]


@pytest.mark.parametrize(
    "target, ms", [(0.5, 5.0), ("0.25", 2.5), ("3ms", 3.0), ("800us", 0.8), ("0.01 s", 10.0)]
)
def test_latency_targets(target, ms):
    assert latency.parse_latency_target(target, 10.0) == pytest.approx(ms)


@pytest.mark.parametrize("target", [0, 1.5, "fast", "-3ms", True])
def test_bad_latency_targets(target):
    with pytest.raises(ValueError, match="bad latency target"):
        latency.parse_latency_target(target, 10.0)


def test_layer_made_slower_by_factorizing_stays_dense(model):
    table = hand_table(model, slow="conv1")
    p = decomp.plan(
        model,
        "auto",
        input_size=SIZE,
        target_latency=0.75,
        threads=1,
        latency_table=table,
        check_landing=False,
    )
    by_name = {lp.name: lp for lp in p.layers}
    assert by_name["conv1"].skip is Skip.NOT_FASTER
    assert (
        "not faster" in by_name["conv1"].reason
        and "2 ms at best vs 1 ms" in by_name["conv1"].reason
    )
    assert by_name["conv2"].method == "tucker"
    assert all(r % 4 == 0 or r in lp.shape[:2] for lp in p.decomposed for r in lp.ranks)
    assert p.rank == "target-latency:0.75"
    record = p.latency
    assert record["predicted_ms"] <= record["target_ms"] == pytest.approx(7.5)
    assert record["remainder_ms"] == pytest.approx(10.0 - 5 * 1.0)  # five eligible layers
    assert record["scale"] == 1.0 and record["floor_ms"] == pytest.approx(5 + 1 + 4 * 0.2)
    assert "measured" not in record


def test_tighter_latency_budget_gives_lower_ranks(model):
    table = hand_table(model)
    plans = [
        decomp.plan(
            model,
            "auto",
            input_size=SIZE,
            target_latency=t,
            threads=1,
            latency_table=table,
            check_landing=False,
        )
        for t in (0.95, 0.7)
    ]
    loose, tight = (p.latency["predicted_ms"] for p in plans)
    assert tight < loose and tight <= 7.0
    assert sum(lp.macs_after for lp in plans[1].layers) <= sum(
        lp.macs_after for lp in plans[0].layers
    )


def test_target_below_the_floor_names_it(model):
    table = hand_table(model)
    with pytest.raises(ValueError, match=r"below the floor of 6 ms \(0.600.*at least 0.60"):
        decomp.plan(
            model,
            "auto",
            input_size=SIZE,
            target_latency="2ms",
            threads=1,
            latency_table=table,
            check_landing=False,
        )


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="not both"):
        decomp.plan(model, "auto", input_size=SIZE, target_latency=0.5, target_macs=0.5)
    with pytest.raises(ValueError, match="unknown runtime"):
        decomp.plan(model, "auto", input_size=SIZE, target_latency=0.5, runtime="tvm")
    with pytest.raises(ValueError, match="cp has no error curve"):
        decomp.plan(model, "cp", input_size=SIZE, target_latency=0.5)


def test_profile_measures_each_geometry_once_and_reuses_the_file(tmp_path):
    model = tiny_net(width=16).eval()
    seen = []
    path = tmp_path / "t.json"
    table = latency.profile(model, "auto", SIZE, threads=1, table=path, progress=seen.append)
    geometries = {
        latency.layer_signature(c.layer, c.method, call)
        for c, calls in candidate_calls(model, "auto", SIZE)
        for call in calls
    }
    assert set(table.layers) == geometries and len(seen) == len(geometries)
    assert table.baseline_ms(model, SIZE) > 0
    assert all(e["dense_ms"] > 0 and e["points"] for e in table.layers.values())
    again = latency.profile(model, "auto", SIZE, threads=1, table=path, progress=seen.append)
    assert len(seen) == len(geometries) and again.layers == table.layers
    with pytest.raises(ValueError, match="measured for torch"):
        latency.profile(model, "auto", SIZE, batch=2, threads=1, table=path)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_paired_latency_reports_the_ratio_and_its_spread(runtime):
    model = tiny_net(width=16).eval()
    compressed = decomp.decompose(model, "tucker", "ratio:0.5", SIZE)
    out = timing.paired_latency(
        model, compressed, SIZE, runtime=runtime, threads=1, rounds=3, block_s=0.002
    )
    assert out["original_ms"] > 0 and out["compressed_ms"] > 0
    low, high = out["speedup_iqr"]
    assert out["speedup_range"][0] <= low <= out["speedup"] <= high <= out["speedup_range"][1]
    assert out["ratio"] == pytest.approx(1 / out["speedup"], rel=0.5)
    assert (out["runtime"], out["batch"], out["threads"], out["rounds"]) == (runtime, 1, 1, 3)


def test_landing_is_measured_paired(model):
    table = hand_table(model)
    table.set_baseline(model, SIZE, timing.measure_model(model, SIZE, key()))
    p = decomp.plan(
        model, "auto", input_size=SIZE, target_latency=1.0, threads=1, latency_table=table
    )
    record = p.latency
    assert 1 <= record["tries"] <= 4
    assert record["measured"]["compressed_ms"] > 0 and record["landing"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_uses_cuda_events():
    model = tiny_net(width=16).eval()
    table = latency.profile(model, "auto", SIZE, device="cuda", batch=8)
    assert table.key.device == "cuda" and table.key.device_name
    assert all(e["dense_ms"] > 0 for e in table.layers.values())
    out = timing.paired_latency(
        model,
        decomp.decompose(model, "tucker", "ratio:0.5", SIZE),
        SIZE,
        device="cuda",
        batch=8,
        rounds=3,
    )
    assert out["device"] == "cuda" and out["speedup"] > 0


def test_bench_latency_judges_landing_by_the_plans_promise():
    from benchmarks.bench_latency import LANDING_WINDOW
    from decomp.plan.latency_budget import ACCEPTED, LANDING, LANDING_AIM

    assert LANDING_WINDOW == ACCEPTED
    assert ACCEPTED[0] < LANDING[0] < LANDING_AIM < LANDING[1] < ACCEPTED[1]


def test_bench_latency_renders_its_rows():
    from benchmarks.bench_latency import render_markdown

    ok = {
        "model": "resnet18",
        "runtime": "onnxruntime",
        "batch": 1,
        "target": 0.5,
        "landing": 0.93,
        "speedup": 2.1,
        "speedup_iqr": [2.0, 2.2],
        "macs_cut": 1.4,
        "efficiency": 1.5,
        "eager_speedup": 1.9,
        "eager_efficiency": 1.36,
        "error": 0.3,
        "factorized": 7,
        "not_faster": 1,
        "profile_s": 9.0,
        "status": "ok",
    }
    low = {
        "model": "resnet18",
        "runtime": "torch",
        "batch": 64,
        "target": 0.25,
        "status": "infeasible",
        "message": "below the floor of 150 ms (0.49 of it)",
    }
    align = {
        "runtime": "torch",
        "batch": 1,
        "channels": 64,
        "size": 16,
        "align": 8,
        "ranks": 35,
        "free": 0.4,
        "median_up_over_r": 1.1,
    }
    side = {
        "plan": "p",
        "planned_ratio": 0.5,
        "measured_ratio": 0.5,
        "macs": 10,
        "f1_epoch0": 0.8,
        "test_f1": 0.9,
    }
    f1 = {"target": 0.5, "status": "ok", "latency": side, "macs": side}
    meta = {"machine": {}, "versions": {}, "config": {}}
    text = render_markdown(
        {
            "meta": meta,
            "rows": [ok, low],
            "alignment": [align],
            "f1": [f1],
            "f1_baseline": {"source": "b.pt", "f1": 0.91},
        }
    )
    assert "| resnet18 | onnxruntime | 1 | 0.5 | 0.930 | 2.10x | 2.00-2.20 |" in text
    assert "below the floor of 150 ms" in text and "Rank alignment" in text
    assert "test F1 0.9100" in text


def test_cli_profile_then_decompose_with_a_latency_target(tmp_path):
    from typer.testing import CliRunner

    from decomp.cli import app

    model = tiny_net(width=16).eval()
    path = tmp_path / "tiny.pt"
    decomp.save(
        model,
        path,
        arch={"factory": "tests.conftest:tiny_net", "kwargs": {"width": 16}},
        input_size=SIZE,
    )
    table = tmp_path / "table.json"
    runner = CliRunner()
    done = runner.invoke(
        app, ["profile", str(path), "--threads", "1", "--latency-table", str(table), "--json"]
    )
    assert done.exit_code == 0, done.output
    assert table.exists() and '"layers"' in done.output
    # every layer faster factorized, for the threads decompose times with by default
    hand = hand_table(model, threads=None)
    hand.save(table)
    done = runner.invoke(
        app,
        [
            "decompose",
            str(path),
            "--method",
            "auto",
            "--target-latency",
            "0.01",
            "--latency-table",
            str(table),
            "--dry-run",
        ],
    )
    assert done.exit_code == 1 and "below the floor" in done.output
    # --threads picks the table's key: a table timed on 1 thread serves --threads 1 only
    hand_table(model, threads=1).save(table)
    args = ["decompose", str(path), "--target-latency", "0.01", "--latency-table", str(table)]
    done = runner.invoke(app, [*args, "--threads", "1", "--dry-run"])
    assert done.exit_code == 1 and "below the floor" in done.output
    other = runner.invoke(app, [*args, "--threads", "2", "--dry-run"])
    assert other.exit_code == 1 and "thread" in other.output and "floor" not in other.output


def test_rank_multiples_follow_the_runtime_and_batch():
    assert latency.align_for("onnxruntime", 1) == latency.align_for("onnxruntime", 64) == 8
    assert latency.align_for("torch", 1) == 4 and latency.align_for("torch", 64) == 16
