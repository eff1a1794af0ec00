"""Rank specs: parsing, canonical text, selected ranks on hand-checked spectra, errors."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rank_selection import (
    MIN_RANK,
    MIN_RANK_FRACTION,
    STRATEGIES,
    RankSpec,
    evbmf_spectrum,
    min_rank,
    parse_rank_spec,
    register,
)
from rank_selection.strategies import ACCEPTED_FORMS

SHAPE = (64, 576)  # R_full = 64


@pytest.fixture(scope="module")
def planted_spectrum() -> np.ndarray:
    """Singular values of a rank-10 64x576 signal far above the noise edge plus N(0, 1) noise.

    (Not noise with its top values replaced: what is left of that is the bottom of a 64x576 noise
    spectrum, flatter than any 54x566 noise, and the noise-model check rightly rejects it.)
    """
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((SHAPE[0], 10)))
    v, _ = np.linalg.qr(rng.standard_normal((SHAPE[1], 10)))
    y = (u * np.linspace(300.0, 500.0, 10)) @ v.T + rng.standard_normal(SHAPE)
    return np.linalg.svd(y, compute_uv=False)


@pytest.fixture(scope="module")
def noise_spectrum() -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.linalg.svd(rng.standard_normal(SHAPE), compute_uv=False)


@pytest.mark.parametrize(
    ("text", "name", "param", "canonical"),
    [
        ("vbmf", "vbmf", None, "vbmf"),
        ("vbmf:0.6", "vbmf", 0.6, "vbmf:0.6"),
        ("vbmf:0", "vbmf", 0.0, "vbmf:0.0"),
        (" vbmf : 1 ", "vbmf", 1.0, "vbmf:1.0"),
        ("ratio:0.5", "ratio", 0.5, "ratio:0.5"),
        ("ratio:1", "ratio", 1.0, "ratio:1.0"),
        ("energy:0.95", "energy", 0.95, "energy:0.95"),
        ("12", "fixed", 12, "12"),
        ("fixed:3", "fixed", 3, "3"),
        ("0.5", "ratio", 0.5, "ratio:0.5"),
        ("1.0", "ratio", 1.0, "ratio:1.0"),
        ("1", "fixed", 1, "1"),
        (7, "fixed", 7, "7"),
        (0.25, "ratio", 0.25, "ratio:0.25"),
    ],
)
def test_specs_parse_and_round_trip(text, name: str, param, canonical: str) -> None:
    spec = parse_rank_spec(text)
    assert (spec.name, spec.param) == (name, param)
    assert str(spec) == canonical
    assert parse_rank_spec(str(spec)) == spec
    assert parse_rank_spec(spec) is spec


def test_vbmf_and_its_weakened_forms(planted_spectrum: np.ndarray) -> None:
    assert evbmf_spectrum(planted_spectrum, SHAPE).rank == 10
    # R = ceil(R_full - WF * (R_full - R_vbmf)) with R_full = 64, R_vbmf = 10.
    expected = {"vbmf": 10, "vbmf:1": 10, "vbmf:0": 64, "vbmf:0.5": 37, "vbmf:0.6": 32}
    for text, rank in expected.items():
        assert parse_rank_spec(text).select(planted_spectrum, SHAPE) == rank, text


def test_only_plain_vbmf_returns_zero(noise_spectrum: np.ndarray) -> None:
    assert parse_rank_spec("vbmf").select(noise_spectrum, SHAPE) == 0
    assert parse_rank_spec("vbmf:1").select(noise_spectrum, SHAPE) == min_rank(SHAPE) == 8
    assert parse_rank_spec("vbmf:0.5").select(noise_spectrum, SHAPE) == 32  # 64 - 0.5 * 64


@pytest.mark.parametrize(
    ("shape", "floor"),
    [((16, 96), 2), ((96, 16), 2), ((64, 576), 8), ((1000, 1280), 125), ((3, 5), 1), ((1, 9), 1)],
)
def test_min_rank_is_an_eighth_of_the_smaller_side(shape: tuple[int, int], floor: int) -> None:
    assert min_rank(shape) == floor
    assert min_rank(shape, fraction=1.0) == min(shape)
    assert MIN_RANK_FRACTION == 0.125


def test_min_rank_is_at_least_eight_where_the_split_is_not_noise_like() -> None:
    assert MIN_RANK == 8
    assert min_rank((16, 96), noise_like=False) == 8
    assert min_rank((6, 96), noise_like=False) == 6  # never above R_full
    assert min_rank((1000, 1280), noise_like=False) == 125


def test_min_rank_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fraction"):
        min_rank((4, 4), fraction=0.0)
    with pytest.raises(ValueError, match="positive"):
        min_rank((0, 4))


def test_vbmf_ranks_are_floored_but_zero_stays_zero() -> None:
    # 64x576: EVBMF keeps the 3 planted components; the floor raises them to 8.
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((64, 3)))
    v, _ = np.linalg.qr(rng.standard_normal((576, 3)))
    y = (u * np.array([300.0, 250.0, 200.0])) @ v.T + rng.standard_normal((64, 576))
    s = np.linalg.svd(y, compute_uv=False)
    assert evbmf_spectrum(s, y.shape).rank == 3
    assert parse_rank_spec("vbmf").select(s, y.shape) == 8
    assert parse_rank_spec("vbmf:1").select(s, y.shape) == 8
    assert parse_rank_spec("vbmf:0.9").select(s, y.shape) == 10  # ceil(64 - 0.9 * 61)
    assert parse_rank_spec("ratio:0.01").select(s, y.shape) == 1  # explicit choices: no floor
    assert parse_rank_spec("2").select(s, y.shape) == 2


def test_vbmf_floor_is_eight_where_the_split_is_not_noise_like() -> None:
    # 16x96, a geometric spectrum over a ratio of 3 and no noise: EVB keeps its top value, the
    # check a few more; neither is evidence enough to cut a 16-channel mode below 8.
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    v, _ = np.linalg.qr(rng.standard_normal((96, 16)))
    s = np.linalg.svd((u * np.geomspace(3.0, 1.0, 16)) @ v.T, compute_uv=False)
    result = evbmf_spectrum(s, (16, 96))
    assert 0 < result.rank < result.checked_rank < 8 and not result.noise_like
    assert parse_rank_spec("vbmf").select(s, (16, 96)) == 8
    weakened = math.ceil(16 - 0.6 * (16 - result.checked_rank))  # above the floor here
    assert parse_rank_spec("vbmf:0.6").select(s, (16, 96)) == weakened > 8


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    text=st.sampled_from(["vbmf", "vbmf:1", "vbmf:0.6", "vbmf:0"]),
)
def test_property_vbmf_ranks_are_zero_or_at_least_the_floor(
    rows: int, cols: int, seed: int, text: str
) -> None:
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(0, min(rows, cols) + 1))
    y = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) * 5.0
    y += rng.standard_normal((rows, cols))
    s = np.linalg.svd(y, compute_uv=False)
    r = parse_rank_spec(text).select(s, y.shape)
    assert r == 0 and text == "vbmf" or min_rank(y.shape) <= r <= min(rows, cols)


@pytest.mark.parametrize(
    ("text", "shape", "rank"),
    [
        ("ratio:0.5", (64, 576), 32),
        ("ratio:0.1", (64, 576), 7),  # 6.4 -> 7
        ("ratio:1", (576, 64), 64),
        ("ratio:0.01", (64, 576), 1),  # 0.64 -> 1
        ("ratio:0.07", (100, 300), 7),  # 0.07 * 100 = 7.000000000000001 in floating point
        ("0.29", (300, 100), 29),  # 0.29 * 100 = 28.999999999999996
        ("12", (64, 576), 12),
        ("100", (64, 576), 64),  # clamped to R_full
        ("1", (3, 5), 1),
    ],
)
def test_ratio_and_fixed(text: str, shape: tuple[int, int], rank: int) -> None:
    s = np.linspace(10.0, 1.0, min(shape))
    assert parse_rank_spec(text).select(s, shape) == rank


@pytest.mark.parametrize(
    ("energy", "rank"),
    [(0.5, 1), (16 / 30, 1), (0.8, 2), (25 / 30, 2), (0.9, 3), (0.96, 3), (0.97, 4), (1.0, 4)],
)
def test_energy(energy: float, rank: int) -> None:
    # s^2 = 16, 9, 4, 1 (total 30): cumulative fractions 16/30, 25/30, 29/30, 1.
    s = np.array([1.0, 4.0, 2.0, 3.0])  # any order
    assert parse_rank_spec(f"energy:{energy!r}").select(s, (4, 10)) == rank


def test_select_accepts_torch_and_degenerate_spectra() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float32)
    assert parse_rank_spec("energy:0.8").select(s, (4, 10)) == 2
    zeros = np.zeros(4)
    assert parse_rank_spec("energy:0.9").select(zeros, (4, 10)) == 1
    assert parse_rank_spec("vbmf").select(zeros, (4, 10)) == 0
    assert parse_rank_spec("vbmf:0.5").select(zeros, (4, 10)) == 2
    assert parse_rank_spec("vbmf").select([5.0], (1, 10)) == 0
    with pytest.raises(ValueError, match="5 singular values"):
        parse_rank_spec("ratio:0.5").select(np.ones(5), (4, 10))


@pytest.mark.parametrize(
    "text",
    [
        "foo",
        "ratio:1.5",
        "ratio:0",
        "energy:0",
        "energy:1.01",
        "vbmf:2",
        "vbmf:-0.1",
        "-3",
        "0",
        0,
        -3,
        "2.5",
        "ratio",
        "ratio:",
        "vbmf:x",
        "nan",
        "energy:inf",
        "foo:3",
        "",
        "fixed:2.5",
        True,
        None,
    ],
)
def test_bad_specs_name_the_text_and_list_accepted_forms(text) -> None:
    with pytest.raises(ValueError, match=re.escape(ACCEPTED_FORMS)) as info:
        parse_rank_spec(text)
    assert repr(text) in str(info.value)


def test_unknown_strategy_lists_registered_names_sorted() -> None:
    with pytest.raises(ValueError, match=re.escape("registered: energy, fixed, ratio, vbmf")):
        parse_rank_spec("foo:3")
    with pytest.raises(ValueError, match=re.escape(str(sorted(STRATEGIES)))):
        RankSpec("bogus")


@pytest.fixture
def half_rank() -> Iterator[str]:
    name = "test_half"

    @register(name)
    def _half(s: np.ndarray, shape: tuple[int, int], param: None) -> int:
        return max(1, min(shape) // 2)

    yield name
    STRATEGIES.pop(name)


def test_register_adds_a_strategy_to_the_spec_language(half_rank: str) -> None:
    spec = parse_rank_spec(half_rank)
    assert str(spec) == half_rank
    assert spec.select(np.ones(10), (10, 20)) == 5
    with pytest.raises(ValueError, match="already registered"):
        register(half_rank)(lambda s, shape, param: 1)
    with pytest.raises(ValueError, match="takes no parameter"):
        parse_rank_spec(f"{half_rank}:3")
    with pytest.raises(ValueError, match="lower-case identifiers"):
        register("Bad:Name")
