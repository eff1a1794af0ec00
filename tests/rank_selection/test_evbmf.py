"""EVBMF: planted ranks, noise variance, invariances, degenerate inputs (all seeded, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rank_selection import NOISE_Z, EVBMFResult, evbmf, evbmf_spectrum, noise_z_scores
from rank_selection.vbmf import evb_tau, singular_values

SCALES = [1e-6, 1e-3, 1.0, 1e3]


def planted(rows: int, cols: int, rank: int, seed: int, sigma: float = 1.0) -> np.ndarray:
    """``rows x cols``: a rank-``rank`` signal well above the noise edge plus N(0, sigma^2)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))  # largest noise singular value, about
    signal = edge * np.linspace(3.0, 6.0, rank)
    return (u * signal) @ v.T + sigma * rng.standard_normal((rows, cols))


def phi(z: float) -> float:
    return math.log1p(z) / z - 0.5


@pytest.mark.parametrize("alpha", [1e-4, 0.01, 1 / 9, 0.5, 1.0])
def test_tau_is_the_zero_of_xi_within_its_bounds(alpha: float) -> None:
    # Xi(tau) = Phi(tau) + Phi(tau / alpha) decreases; its zero lies in [z sqrt(alpha), z].
    tau = evb_tau(alpha)
    assert abs(phi(tau) + phi(tau / alpha)) < 1e-12
    assert 2.5128 * math.sqrt(alpha) <= tau <= 2.5129


def test_tau_at_square_is_the_zero_of_phi() -> None:
    # alpha = 1: Xi = 2 Phi, whose zero is z = 2.5129 (log(1 + z) = z / 2).
    assert evb_tau(1.0) == pytest.approx(2.5129, abs=1e-4)


@pytest.mark.parametrize(
    ("rows", "cols", "rank"),
    [(64, 576, 10), (200, 50, 5), (30, 30, 3), (100, 300, 20), (576, 64, 8), (16, 400, 1)],
)
def test_planted_rank_is_recovered(rows: int, cols: int, rank: int) -> None:
    for seed in range(3):
        result = evbmf(planted(rows, cols, rank, seed))
        assert result.rank == result.checked_rank == rank, f"seed {seed}"


@pytest.mark.parametrize(("rows", "cols", "rank"), [(64, 576, 10), (200, 50, 5), (150, 150, 10)])
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_sigma2_estimate_is_close_to_the_true_noise_variance(
    rows: int, cols: int, rank: int, sigma: float
) -> None:
    result = evbmf(planted(rows, cols, rank, seed=7, sigma=sigma))
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.1)


@pytest.mark.parametrize(("rows", "cols", "rank"), [(64, 576, 10), (200, 50, 5), (40, 40, 4)])
def test_rank_is_invariant_to_transpose_and_scale(rows: int, cols: int, rank: int) -> None:
    y = planted(rows, cols, rank, seed=1)
    base = evbmf(y)
    assert base.rank == rank
    assert evbmf(y.T).rank == evbmf(y.T).checked_rank == rank
    for c in SCALES:
        scaled = evbmf(c * y)
        assert scaled.rank == scaled.checked_rank == rank, f"c={c}"
        assert scaled.sigma2 == pytest.approx(c**2 * base.sigma2, rel=1e-6)
        assert scaled.threshold == pytest.approx(c * base.threshold, rel=1e-6)


@pytest.mark.parametrize(("rows", "cols"), [(50, 50), (64, 576), (300, 100), (20, 1000), (5, 7)])
def test_pure_noise_gives_rank_zero(rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows * cols)
    for _ in range(3):
        result = evbmf(rng.standard_normal((rows, cols)))
        assert result.rank == result.checked_rank == 0
        if rows * cols > 1000:
            assert result.sigma2 == pytest.approx(1.0, rel=0.1)


def test_spectrum_alone_gives_the_matrix_result() -> None:
    y = planted(80, 40, 6, seed=3)
    s = np.linalg.svd(y, compute_uv=False)
    from_matrix = evbmf(y)
    shuffled = np.random.default_rng(0).permutation(s)
    from_spectrum = evbmf_spectrum(shuffled, (40, 80))
    assert from_spectrum.rank == from_matrix.rank == 6
    assert from_spectrum.sigma2 == pytest.approx(from_matrix.sigma2, rel=1e-9)
    np.testing.assert_allclose(from_spectrum.singular_values, from_matrix.singular_values)
    assert from_matrix.shape == (40, 80)


def test_singular_values_match_numpy_on_wide_and_tall() -> None:
    rng = np.random.default_rng(0)
    for shape in [(20, 300), (300, 20), (30, 40)]:
        y = rng.standard_normal(shape)
        expected = np.linalg.svd(y, compute_uv=False)
        np.testing.assert_allclose(singular_values(y), expected, rtol=1e-10)


def test_torch_and_float32_inputs_match_numpy() -> None:
    y = planted(48, 200, 4, seed=5)
    expected = evbmf(y)
    from_torch = evbmf(torch.from_numpy(y))
    assert from_torch.rank == expected.rank == 4
    assert from_torch.sigma2 == pytest.approx(expected.sigma2, rel=1e-12)
    for y32 in (y.astype(np.float32), torch.from_numpy(y).float(), torch.from_numpy(y).half()):
        result = evbmf(y32)
        assert result.rank == 4
        assert result.sigma2 == pytest.approx(expected.sigma2, rel=1e-2)
    spectrum = torch.linalg.svdvals(torch.from_numpy(y).float())
    assert evbmf_spectrum(spectrum, y.shape).rank == 4


def test_known_sigma2_uses_the_evb_threshold() -> None:
    y = planted(64, 576, 10, seed=2)
    result = evbmf(y, sigma2=1.0)
    x_bar = (1 + evb_tau(64 / 576)) * (1 + (64 / 576) / evb_tau(64 / 576))
    assert result.threshold == pytest.approx(math.sqrt(576 * x_bar))
    assert result.rank == 10
    assert result.sigma2 == 1.0
    assert evbmf(y, sigma2=0.0).rank == 64
    assert evbmf(y, sigma2=1e6).rank == 0


@pytest.mark.parametrize("shape", [(1, 1), (1, 10), (10, 1), (2, 50), (50, 2), (2, 2), (3, 3)])
def test_small_matrices_do_not_crash(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for y in (rng.standard_normal(shape), np.ones(shape), np.zeros(shape)):
        result = evbmf(y)
        assert isinstance(result, EVBMFResult)
        assert 0 <= result.rank <= min(shape)
        assert math.isfinite(result.sigma2) and result.sigma2 >= 0


def test_zero_matrix_and_tiny_flat_spectrum_give_rank_zero() -> None:
    zero = evbmf(np.zeros((8, 12)))
    assert (zero.rank, zero.sigma2, zero.threshold) == (0, 0.0, 0.0)
    # Five equal values: the flattest spectrum there is, yet z = -(5 + 1) / 2 = -3 is within
    # NOISE_Z: too few values to tell a plateau of signal from noise, so EVB's 0 stands.
    flat = evbmf_spectrum(np.full(5, 3.0), (5, 9))
    assert flat.rank == flat.checked_rank == 0
    assert flat.noise_z == pytest.approx(-3.0)
    assert flat.sigma2 == pytest.approx(9.0 / 9)  # sum s^2 / (L M) = 5 * 9 / 45


def with_spectrum(rows: int, cols: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """``rows x cols`` with singular values ``s`` and random singular vectors, no noise."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, s.size)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, s.size)))
    return (u * s) @ v.T


def test_noise_z_scores_follow_the_formula() -> None:
    # s = (2, 1) of a 2x10 matrix: x = (4, 1), U = 2 * 17 / 25 - 1 = 0.36, z = (10 U - 3) / 2.
    z = noise_z_scores(np.array([1.0, 2.0]), (10, 2))
    assert z == pytest.approx([(10 * 0.36 - 3) / 2, (9 * 0.0 - 2) / 2])
    assert noise_z_scores(np.zeros(3), (3, 7)).tolist() == [0.0, 0.0, 0.0]
    assert noise_z_scores([4.0, 0.0, 0.0], (3, 7))[1] == 0.0  # nothing left: nothing to reject
    s = np.linspace(5.0, 1.0, 16)
    np.testing.assert_allclose(noise_z_scores(1e-3 * s, (96, 16)), noise_z_scores(s, (16, 96)))


@pytest.mark.parametrize(("rows", "cols"), [(16, 48), (8, 200), (40, 40)])
def test_noise_z_scores_are_standard_on_noise(rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows + cols)
    z = np.array(
        [
            noise_z_scores(np.linalg.svd(rng.standard_normal((rows, cols)), compute_uv=False),
                           (rows, cols))[0]
            for _ in range(300)
        ]
    )  # fmt: skip
    assert abs(z.mean()) < 0.35 and 0.8 < z.std() < 1.2
    assert np.mean(np.abs(z) > NOISE_Z) < 0.01


@pytest.mark.parametrize("shape", [(16, 96), (96, 16), (40, 144), (128, 512)])
@pytest.mark.parametrize("ratio", [1.0, 1.5])
def test_spectrum_flatter_than_noise_is_full_rank_signal(
    shape: tuple[int, int], ratio: float
) -> None:
    # ratio 1: a semi-orthogonal matrix. Noise of these shapes spreads its singular values by
    # (1 + sqrt(L/M)) / (1 - sqrt(L/M)) = 2.4 to 3.7, so a spread of 1.5 cannot be noise.
    y = with_spectrum(*shape, np.linspace(ratio, 1.0, min(shape)))
    result = evbmf(y)
    assert result.rank == 0  # the cause: a flat spectrum gives EVB nothing to call signal
    assert result.noise_z < -NOISE_Z
    assert result.checked_rank == min(shape)
    assert evbmf(y.T).checked_rank == evbmf(1e-4 * y).checked_rank == min(shape)


@pytest.mark.parametrize(
    ("shape", "ratio", "raw_rank", "at_least"),
    [((16, 96), 5.0, 2, 10), ((96, 16), 5.0, 2, 10), ((24, 144), 5.0, 2, 16)],
)
def test_smoothly_decaying_spectrum_is_not_cut_to_its_top(
    shape: tuple[int, int], ratio: float, raw_rank: int, at_least: int
) -> None:
    # A linear spectrum (no bulk, no noise): EVB keeps its top values and calls the rest noise,
    # which is more spread than noise of that shape; the check keeps adding values until what is
    # left could be noise.
    y = with_spectrum(*shape, np.linspace(ratio, 1.0, min(shape)))
    result = evbmf(y)
    assert result.rank == raw_rank and result.noise_z > NOISE_Z
    assert result.checked_rank >= at_least
    left = noise_z_scores(result.singular_values, shape)[result.checked_rank]
    assert abs(left) <= NOISE_Z


@pytest.mark.parametrize(("rows", "cols", "rank"), [(16, 96, 3), (50, 50, 6), (100, 300, 12)])
def test_check_never_overshoots_a_weak_planted_rank(rows: int, cols: int, rank: int) -> None:
    # Signal at 0.8 to 1.6 times the noise edge: EVB misses some of it; the check may find more,
    # never more than was planted (unless EVB kept nothing at all, then it keeps everything).
    for seed in range(5):
        rng = np.random.default_rng(seed)
        u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
        edge = math.sqrt(rows) + math.sqrt(cols)
        y = (u * (edge * np.linspace(0.8, 1.6, rank))) @ v.T + rng.standard_normal((rows, cols))
        result = evbmf(y)
        assert 0 < result.rank <= result.checked_rank <= rank, f"seed {seed}"


def test_spectrum_without_spikes_that_is_not_noise_is_full_rank() -> None:
    # 16x96 (the shape of a 1x1 conv): a smooth spectrum over a ratio of 3 has no value above
    # EVB's threshold (rank 0) but is far more spread than noise (z > NOISE_Z): no cut is safe.
    y = with_spectrum(16, 96, np.linspace(3.0, 1.0, 16))
    result = evbmf(y)
    assert result.rank == 0 and result.noise_z > NOISE_Z
    assert result.checked_rank == 16 and not result.noise_like
    noise = evbmf(np.random.default_rng(0).standard_normal((16, 96)))
    assert noise.rank == noise.checked_rank == 0 and noise.noise_like


def test_known_sigma2_is_not_checked() -> None:
    y = with_spectrum(16, 96, np.ones(16))
    result = evbmf(y, sigma2=1.0)
    assert result.noise_z is None and result.rank == result.checked_rank == 0


def test_exactly_low_rank_matrix_keeps_its_rank() -> None:
    rng = np.random.default_rng(4)
    y = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 90))
    for c in SCALES:
        assert evbmf(c * y).rank == evbmf(c * y).checked_rank == 3
        assert evbmf(c * y.T).rank == evbmf(c * y.T).checked_rank == 3


def test_missing_singular_values_count_as_zero() -> None:
    s = np.array([50.0, 40.0, 1.0, 1.0])
    padded = evbmf_spectrum(np.concatenate([s, np.zeros(6)]), (10, 40))
    short = evbmf_spectrum(s, (10, 40))
    assert short.rank == padded.rank
    assert short.singular_values.shape == (10,)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: evbmf(np.ones(5)), "2-D"),
        (lambda: evbmf(np.full((3, 3), np.nan)), "finite"),
        (lambda: evbmf(np.zeros((0, 4))), "positive"),
        (lambda: evbmf_spectrum(np.ones(5), (4, 9)), "5 singular values"),
        (lambda: evbmf_spectrum([1.0, np.inf], (4, 9)), "finite"),
        (lambda: evbmf(np.ones((3, 4)), sigma2=-1.0), "sigma2"),
        (lambda: noise_z_scores(np.ones(5), (4, 9)), "5 singular values"),
    ],
)
def test_bad_inputs_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@st.composite
def matrices(draw: st.DrawFn) -> np.ndarray:
    """Small seeded matrices: low rank plus noise, or small integers (often rank-deficient)."""
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        return rng.integers(-3, 4, size=(rows, cols)).astype(np.float64)
    rank = draw(st.integers(0, min(rows, cols)))
    noise = draw(st.sampled_from([0.0, 0.01, 1.0]))
    signal = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    return 10.0 * signal + noise * rng.standard_normal((rows, cols))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(y=matrices(), c=st.sampled_from(SCALES))
def test_property_rank_in_bounds_and_invariant(y: np.ndarray, c: float) -> None:
    result = evbmf(y)
    assert 0 <= result.rank <= min(y.shape)
    assert evbmf(y.T).rank == result.rank
    assert evbmf(c * y).rank == result.rank


@settings(max_examples=100, deadline=None, derandomize=True)
@given(y=matrices(), c=st.sampled_from(SCALES))
def test_property_checked_rank_in_bounds_and_invariant(y: np.ndarray, c: float) -> None:
    result = evbmf(y)
    assert result.rank <= result.checked_rank <= min(y.shape)
    assert evbmf(y.T).checked_rank == result.checked_rank
    assert evbmf(c * y).checked_rank == result.checked_rank
