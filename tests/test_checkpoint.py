"""Tests of decomp.checkpoint: the three kinds of model file, safe loading, atomic saving."""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import decomp
from decomp import checkpoint
from decomp.arch import arch_ref
from decomp.checkpoint import DecompFileError, load, model_meta, save
from tests.conftest import tiny_net

ARCH = "tests.conftest:TinyNet"
SIZE = (3, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine OpenMP spinning makes eigh 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *SIZE, generator=torch.Generator().manual_seed(3))


def _out(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_x() if x is None else x)


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


class _Payload:
    """Unpickling this creates the marker file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def compressed() -> nn.Module:
    """tiny_net decomposed by auto at half ranks, carrying its arch reference."""
    base = tiny_net()
    base._decomp_arch = arch_ref(ARCH)
    return decomp.decompose(base, "auto", "ratio:0.5", SIZE)


# ------------------------------------------------------------------------- round trips


def test_round_trip_gives_identical_outputs(tmp_path: Path, compressed: nn.Module) -> None:
    path = save(compressed, tmp_path / "m.pt", input_size=SIZE, class_names=list("abcdefghij"))
    first, second = load(path), load(path)
    assert torch.equal(_out(first), _out(compressed))
    assert torch.equal(_out(first), _out(second))
    assert decomp.applied_plans(first) == decomp.applied_plans(compressed)
    assert model_meta(first)["class_names"] == list("abcdefghij")
    assert not first.training


def test_decomp_file_is_plain_data(tmp_path: Path, compressed: nn.Module) -> None:
    path = save(compressed, tmp_path / "m.pt", input_size=SIZE, extra={"bn_calibrated": True})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "decomp" and payload["format_version"] == 1
    assert payload["arch"] == {"factory": ARCH, "kwargs": {}}
    assert payload["input_size"] == list(SIZE)
    assert payload["extra"] == {"bn_calibrated": True}
    assert set(payload["versions"]) >= {"torch", "torchvision", "decomp"}
    assert len(payload["plans"]) == 1 and payload["plans"][0]["method"] == "auto"


def test_state_dict_with_arch_then_save_needs_no_arguments(tmp_path: Path) -> None:
    source = tmp_path / "sd.pt"
    torch.save(tiny_net(width=8, num_classes=4).state_dict(), source)
    model = load(source, arch=ARCH, arch_kwargs='{"width": 8, "num_classes": 4}')
    small = decomp.decompose(model, "tucker", "ratio:0.5", SIZE)
    path = save(small, tmp_path / "small.pt")  # arch, kwargs, input size: all from the model
    again = load(path)
    assert torch.equal(_out(again), _out(small))
    payload = torch.load(path, weights_only=True)
    assert payload["arch"]["kwargs"] == {"width": 8, "num_classes": 4}
    assert payload["input_size"] == list(SIZE)
    assert payload["source_sha256"] == checkpoint.file_sha256(source)


def test_two_plans_rebuild(tmp_path: Path) -> None:
    source = tmp_path / "sd.pt"
    torch.save(tiny_net().state_dict(), source)
    model = load(source, arch=ARCH)
    twice = decomp.decompose(decomp.decompose(model, "tucker", 0.5, SIZE), "svd", 0.5, SIZE)
    assert len(decomp.applied_plans(twice)) == 2
    path = save(twice, tmp_path / "twice.pt")
    assert torch.equal(_out(load(path)), _out(twice))


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_nested_and_prefixed_state_dicts(tmp_path: Path, key: str) -> None:
    state = {f"module.{k}": v for k, v in tiny_net().state_dict().items()}
    torch.save({key: state, "epoch": 3}, tmp_path / "ckpt.pt")
    model = load(tmp_path / "ckpt.pt", arch=ARCH)
    assert torch.equal(_out(model), _out(tiny_net()))


def test_thop_buffers_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tiny_net().state_dict()
    state["conv1.total_ops"] = torch.zeros(1)
    torch.save(state, tmp_path / "sd.pt")
    with caplog.at_level(logging.WARNING, logger="decomp"):
        load(tmp_path / "sd.pt", arch=ARCH)
    assert "thop" in caplog.text


def test_arch_override_on_decomp_file(tmp_path: Path, compressed: nn.Module) -> None:
    path = save(compressed, tmp_path / "m.pt")
    assert torch.equal(_out(load(path, arch=ARCH)), _out(compressed))


# ------------------------------------------------------------- what a file may make us call


@pytest.mark.parametrize(
    "factory",
    ["os:system", "subprocess:run", "shutil:rmtree", "builtins:exec", "torch:save"],
)
def test_a_file_cannot_name_a_dangerous_factory(tmp_path: Path, factory: str) -> None:
    marker = tmp_path / "marker"
    payload = {
        "format": "decomp",
        "format_version": 1,
        "arch": {"factory": factory, "kwargs": {"command": f"touch {marker}"}},
        "plans": [],
        "state_dict": {},
    }
    torch.save(payload, tmp_path / "crafted.pt")
    with pytest.raises(DecompFileError, match=f"calling {factory}, and decomp calls only"):
        load(tmp_path / "crafted.pt")
    assert not marker.exists()


def unannotated_net(width: int = 16):
    """A factory without a return annotation: files may not name it on their own word."""
    return tiny_net(width=width)


def test_an_unannotated_factory_needs_confirmation(tmp_path: Path) -> None:
    model = decomp.decompose(tiny_net(), "tucker", 0.5, SIZE)
    spec = "tests.test_checkpoint:unannotated_net"
    save(model, tmp_path / "m.pt", arch=spec)
    with pytest.raises(DecompFileError, match=f"confirm with --arch {spec}"):
        load(tmp_path / "m.pt")
    assert torch.equal(_out(load(tmp_path / "m.pt", arch=spec)), _out(model))


def test_an_annotated_factory_function_loads(tmp_path: Path) -> None:
    model = decomp.decompose(tiny_net(), "tucker", 0.5, SIZE)
    save(model, tmp_path / "m.pt", arch="tests.conftest:tiny_net")  # -> TinyNet
    assert torch.equal(_out(load(tmp_path / "m.pt")), _out(model))


def test_torchvision_builders_need_no_confirmation(tmp_path: Path) -> None:
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    arch = {"factory": "torchvision.models:mobilenet_v3_small", "kwargs": {"num_classes": 3}}
    save(model, tmp_path / "m.pt", arch=arch)
    assert torch.equal(_out(load(tmp_path / "m.pt")), _out(model))


# ------------------------------------------------------------------------------ pickles


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_untrusted_payload_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(_Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DecompFileError, match="--trust-pickle") as info:
        load(path)
    assert "runs code" in str(info.value)
    if writer == "torch.save":
        assert "posix.system" in str(info.value) or "nt.system" in str(info.value)
    assert not marker.exists()


def test_whole_module_needs_trust(tmp_path: Path) -> None:
    torch.save(tiny_net(), tmp_path / "whole.pt")
    with pytest.raises(DecompFileError, match="pickled Python object .*TinyNet"):
        load(tmp_path / "whole.pt")
    model = load(tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(_out(model), _out(tiny_net()))


def test_trusted_pickle_saves_as_pickle_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save(tiny_net(), tmp_path / "whole.pt")
    model = decomp.decompose(load(tmp_path / "whole.pt", trust_pickle=True), "tucker", 0.5, SIZE)
    with caplog.at_level(logging.WARNING, logger="decomp"):
        path = save(model, tmp_path / "out.pt")
    assert "pickle" in caplog.text
    with pytest.raises(DecompFileError, match="--trust-pickle"):
        load(path)
    assert torch.equal(_out(load(path, trust_pickle=True)), _out(model))


def test_trusted_pickle_with_arch_saves_a_safe_file(tmp_path: Path) -> None:
    torch.save(tiny_net(), tmp_path / "whole.pt")
    model = load(tmp_path / "whole.pt", trust_pickle=True, arch=ARCH)
    path = save(decomp.decompose(model, "tucker", 0.5, SIZE), tmp_path / "out.pt")
    assert torch.load(path, weights_only=True)["format"] == "decomp"
    with pytest.raises(DecompFileError, match="does not rebuild"):
        load(tmp_path / "whole.pt", trust_pickle=True, arch=ARCH, arch_kwargs={"width": 8})


# --------------------------------------------------------------------------- bad files


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "truncated":
        torch.save(tiny_net().state_dict(), path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "text":
        path.write_text("hello, this is not a model\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)
    elif kind == "state_dict":
        torch.save(tiny_net().state_dict(), path)
    return path


BAD_FILES = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "is empty",
    "truncated": "not a readable PyTorch file",
    "text": "not a readable PyTorch file",
    "list": "holds a list of 3 items, not a model",
    "tensor": "holds a bare tensor of shape [3], not a model",
    "torchscript": "TorchScript archive",
    "state_dict": "pass --arch MODULE:FACTORY",
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_get_clear_errors(tmp_path: Path, kind: str) -> None:
    path = _bad_file(tmp_path, kind)
    with pytest.raises(DecompFileError, match=re.escape(BAD_FILES[kind])) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_newer_format_is_refused(tmp_path: Path, compressed: nn.Module) -> None:
    path = save(compressed, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(DecompFileError, match="upgrade decomp"):
        load(tmp_path / "new.pt")


ARCH_ERRORS = [
    ("nonexistent_pkg_xyz:build", None, "cannot import 'nonexistent_pkg_xyz'"),
    ("tests.conftest:tiny_nett", None, "has no attribute 'tiny_nett'; did you mean tiny_net"),
    ("tests.conftest:REPO", None, "not a callable"),
    ("tests.conftest:tiny_net", '{"depth": 3}', "raised TypeError"),
    ("tests.conftest:tiny_net", "[1, 2]", "must be a JSON object"),
    ("tests.conftest:tiny_net", "{num_classes: 9}", "not valid JSON"),
    ("builtins:dict", None, "returned a dict, not an nn.Module"),
    ("resnet18", None, "expected MODULE:FACTORY"),
]


@pytest.mark.parametrize(("arch", "kwargs", "message"), ARCH_ERRORS)
def test_arch_errors(tmp_path: Path, arch: str, kwargs: str | None, message: str) -> None:
    torch.save(tiny_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(DecompFileError, match=message):
        load(tmp_path / "sd.pt", arch=arch, arch_kwargs=kwargs)


def test_state_dict_that_does_not_fit_names_keys(tmp_path: Path) -> None:
    state = tiny_net().state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "sd.pt")
    with pytest.raises(DecompFileError) as info:
        load(tmp_path / "sd.pt", arch=ARCH, arch_kwargs={"num_classes": 9})
    text = str(info.value)
    assert "1 missing keys: fc.bias" in text
    assert "1 unexpected keys: extra.weight" in text
    assert "fc.weight (file [10, 32], model [9, 32])" in text


# ------------------------------------------------------------------------------ saving


def test_save_refuses_the_source_file(tmp_path: Path) -> None:
    source = tmp_path / "sd.pt"
    torch.save(tiny_net().state_dict(), source)
    before = source.read_bytes()
    model = load(source, arch=ARCH)
    with pytest.raises(DecompFileError, match="is the input file"):
        save(model, source)
    assert source.read_bytes() == before


def test_save_without_arch_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DecompFileError, match="no architecture reference"):
        save(tiny_net(), tmp_path / "m.pt")
    assert _files(tmp_path) == set()
    save(tiny_net(), tmp_path / "m.pt", allow_pickle=True)
    assert torch.equal(_out(load(tmp_path / "m.pt", trust_pickle=True)), _out(tiny_net()))


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(
    tmp_path: Path, compressed: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.pt"
    target.write_bytes(b"old contents")

    def broken_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(compressed, target)
    assert target.read_bytes() == b"old contents"
    assert _files(tmp_path) == {"m.pt"}


def test_output_folder_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DecompFileError, match="does not exist"):
        checkpoint.check_output_path(tmp_path / "nope" / "m.pt")
    (tmp_path / "file").touch()
    with pytest.raises(DecompFileError, match="is not a folder"):
        checkpoint.check_output_path(tmp_path / "file" / "m.pt")
    with pytest.raises(DecompFileError, match="is a directory"):
        checkpoint.check_output_path(tmp_path)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(DecompFileError, match="cannot write to folder .*Permission denied"):
        checkpoint.check_output_path(tmp_path / "m.pt")


def test_extra_must_be_plain_data(tmp_path: Path, compressed: nn.Module) -> None:
    with pytest.raises(TypeError, match="extra\\['fn'\\]"):
        save(compressed, tmp_path / "m.pt", extra={"fn": print})
    assert _files(tmp_path) == set()
