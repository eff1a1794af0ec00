"""decomp's CP-ALS (decomp.factorize.cp_als) and the thread policy of decomp.factorize.linalg.

Tiny seeded kernels: planted ranks recovered, error falling with rank, a degenerate kernel
through the divergence fallback, dtypes, the progress hook, tensorly's parafac as the reference.
"""

import logging
import math
import sys

import pytest
import torch

import decomp
from decomp._tensorly import parafac
from decomp.factorize import CPDivergenceError, cp_factors, linalg
from decomp.factorize.cp_als import cp_als, reporting_sweeps

cp_module = sys.modules["decomp.factorize.cp"]  # the name ``cp`` is the factorizer function


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref.double() - out.double()).norm() / ref.double().norm()).item()


def planted(dims: tuple[int, ...], rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(d, rank, generator=g) for d in dims]
    return torch.einsum("or,ir,hr,wr->oihw", *factors)


def random_kernel(dims: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*dims, generator=torch.Generator().manual_seed(seed))


def term_norms(f: cp_module.CPFactors) -> torch.Tensor:
    return f.out.norm(dim=0) * f.inp.norm(dim=0) * f.vertical.norm(dim=0) * f.horizontal.norm(dim=0)


def border_rank_kernel(dims: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """a(x)a(x)a(x)b + a(x)a(x)b(x)a + a(x)b(x)a(x)a + b(x)a(x)a(x)a: rank 4, border rank 2.

    Rank-2 fits get arbitrarily close only through two huge, cancelling terms (the derivative of
    (a + t b)^4 at t = 0), the textbook case where plain ALS degenerates.
    """
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(d, generator=g) for d in dims]
    b = [torch.randn(d, generator=g) for d in dims]
    terms = [[b[m] if m == k else a[m] for m in range(4)] for k in range(4)]
    return sum(torch.einsum("o,i,h,w->oihw", *t) for t in terms)


@pytest.mark.parametrize(
    "dims, rank",
    [
        ((16, 12, 3, 3), 4),  # compressed: the core keeps 4 x 4 of 16 x 12 channel pairs
        ((10, 8, 3, 3), 3),
        ((8, 8, 5, 5), 6),  # R above both spatial sizes
        ((6, 3, 3, 3), 5),  # R above Cin: no compression
        ((24, 20, 3, 3), 7),  # tensorly's parafac stops at 5e-2 here
        ((24, 20, 1, 3), 5),  # a 1 x 3 kernel: tensorly 5e-3
    ],
)
def test_planted_rank_is_recovered(dims, rank):
    weight = planted(dims, rank)
    factors, error = cp_als(weight, rank)
    approx = torch.einsum("or,ir,hr,wr->oihw", *factors)
    assert rel_error(weight, approx) < 1e-4 and error < 1e-4
    assert rel_error(weight, cp_factors(weight, rank).reconstruct()) < 1e-4


@pytest.mark.parametrize("threads", [1, 2])
def test_planted_recovery_does_not_depend_on_threads(threads):
    """The planted case of test_factorize that once passed or failed with the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = planted((8, 8, 5, 5), 6)
        assert rel_error(weight, cp_factors(weight, 6).reconstruct()) < 1e-5
    finally:
        torch.set_num_threads(before)


def test_error_falls_as_rank_grows():
    weight = random_kernel((16, 12, 3, 3))
    errors = [cp_als(weight, r)[1] for r in (2, 6, 12, 24)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.8 * errors[0], errors


@pytest.mark.parametrize(
    "dims, rank", [((12, 10, 3, 3), 4), ((16, 16, 3, 3), 5), ((8, 3, 5, 5), 3)]
)
def test_error_no_worse_than_tensorly(dims, rank):
    weight = random_kernel(dims, seed=sum(dims))
    weights, factors = parafac(weight, rank)
    theirs = rel_error(weight, torch.einsum("r,or,ir,hr,wr->oihw", weights, *factors))
    ours = rel_error(weight, cp_factors(weight, rank).reconstruct())
    assert ours <= theirs * 1.002, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    weight = random_kernel((8, 6, 3, 3)).to(dtype)
    factors, _ = cp_als(weight, 3)
    assert all(f.dtype == dtype for f in factors)
    result = cp_factors(weight, 3)
    assert all(
        f.dtype == dtype for f in (result.out, result.inp, result.vertical, result.horizontal)
    )


def test_zero_kernel_gives_zero_factors():
    weight = torch.zeros(6, 4, 3, 3)
    factors, error = cp_als(weight, 3)
    assert error == 0 and all(not f.any() for f in factors)
    assert not cp_factors(weight, 3).reconstruct().any()


def test_scale_does_not_change_the_fit():
    weight = random_kernel((10, 8, 3, 3))
    errors = [cp_als(weight * scale, 4)[1] for scale in (1.0, 1e-4, 1e4)]
    assert max(errors) - min(errors) < 1e-5, errors


def test_progress_hook_sees_every_sweep():
    weight = random_kernel((16, 12, 3, 3))
    seen: list[tuple[int, float]] = []
    _, error = cp_als(weight, 4, n_iter_max=30, progress=lambda k, e: seen.append((k, e)))
    sweeps = [k for k, _ in seen]
    assert sweeps == list(range(1, len(seen) + 1)) and 1 < len(seen) <= 60  # core + full
    errors = [e for _, e in seen]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] == pytest.approx(error)
    assert errors[-1] == pytest.approx(rel_error(weight, cp_factors(weight, 4, 30).reconstruct()))


def test_an_enclosing_reporter_sees_the_sweeps_of_a_whole_model():
    """How the command line shows CP's error: decomp.decompose knows nothing of sweeps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 12, 3), torch.nn.ReLU(), torch.nn.Conv2d(12, 16, 3)
    )
    seen: list[tuple[int, float]] = []
    with reporting_sweeps(lambda k, e: seen.append((k, e))):
        decomp.decompose(model, "cp", 4, (3, 12, 12), force=True)
    restarts = [i for i, (k, _) in enumerate(seen) if k == 1]
    assert restarts[0] == 0 and len(restarts) == 2  # one run per conv, sweeps from 1
    assert all(0 < e < 1 for _, e in seen)
    own: list[int] = []
    with reporting_sweeps(lambda k, e: seen.append((k, e))):
        before = len(seen)
        cp_als(random_kernel((16, 12, 3, 3)), 4, n_iter_max=5, progress=lambda k, e: own.append(k))
    assert own and len(seen) == before  # a run's own progress wins
    cp_als(random_kernel((16, 12, 3, 3)), 4, n_iter_max=5)
    assert len(seen) == before  # and the reporter is gone after the block


def test_tol_stops_early():
    weight = random_kernel((16, 12, 3, 3))
    counts = {}
    for tol in (1e-2, 0.0):
        counts[tol] = 0

        def count(_sweep: int, _error: float, tol: float = tol) -> None:
            counts[tol] += 1

        cp_als(weight, 4, n_iter_max=40, tol=tol, progress=count)
    assert counts[1e-2] < counts[0.0] <= 80  # tol 0 still stops when rounding ends the descent


def test_degenerate_kernel_gives_a_bounded_fit_or_a_clear_error():
    weight = border_rank_kernel((5, 4, 3, 3))
    try:
        result = cp_factors(weight, 2)
    except CPDivergenceError as exc:
        assert "use tucker" in str(exc)
        return
    assert math.isfinite(rel_error(weight, result.reconstruct()))
    assert term_norms(result).max() < cp_module.DIVERGENCE_RATIO * weight.norm()


def test_divergence_check_triggers_the_ridge_fallback(monkeypatch, caplog):
    """Plain ALS on the border-rank kernel reaches two cancelling terms twice the kernel's norm;
    with the check set to flag that, the ridge retry must return smaller, bounded terms."""
    weight = border_rank_kernel((5, 4, 3, 3))
    plain, _ = cp_als(weight, 2)
    plain_worst = (term_norms(cp_module.CPFactors(*plain)).max() / weight.norm()).item()
    ridged, _ = cp_als(weight, 2, ridge=cp_module.RIDGE / 2)
    ridge_worst = (term_norms(cp_module.CPFactors(*ridged)).max() / weight.norm()).item()
    assert ridge_worst < plain_worst
    monkeypatch.setattr(cp_module, "DIVERGENCE_RATIO", (plain_worst + ridge_worst) / 2)
    with caplog.at_level(logging.WARNING, logger="decomp.factorize.cp"):
        result = cp_factors(weight, 2)
    assert "retrying with a ridge penalty" in caplog.text
    assert (term_norms(result).max() / weight.norm()).item() < cp_module.DIVERGENCE_RATIO
    assert rel_error(weight, result.reconstruct()) < 0.1
    monkeypatch.setattr(cp_module, "DIVERGENCE_RATIO", 0.1)  # nothing passes
    with pytest.raises(CPDivergenceError, match="use tucker or a lower CP rank"):
        cp_factors(weight, 2)


# --------------------------------------------------------------------------- thread policy


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_solves_run_on_the_policy_threads_and_restore(two_threads):
    with linalg.solver_threads(1e6) as inside:
        assert inside == torch.get_num_threads() == linalg.SOLVER_THREADS == 1
        with linalg.solver_threads(1e6) as nested:
            assert nested == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with linalg.solver_threads(10 * linalg.SMALL_SOLVE_FLOPS) as inside:
        assert inside == torch.get_num_threads() == 2


def test_policy_can_be_switched_off_and_survives_errors(two_threads, monkeypatch):
    with pytest.raises(RuntimeError), linalg.solver_threads(1e6):
        raise RuntimeError("inside a solve")
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(linalg, "SOLVER_THREADS", None)
    with linalg.solver_threads(1e6) as inside:
        assert inside == 2


def test_cp_als_runs_under_the_policy(two_threads, monkeypatch):
    seen = []
    monkeypatch.setattr(torch.linalg, "cholesky_ex", _spy(torch.linalg.cholesky_ex, seen))
    cp_als(random_kernel((8, 6, 3, 3)), 3, n_iter_max=3)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def _spy(fn, seen):
    def wrapper(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fn(*args, **kwargs)

    return wrapper
