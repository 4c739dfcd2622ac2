"""OSSCAR's per-layer maths against direct float64 computations and an exhaustive oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

from slmserve.prune import baselines
from slmserve.prune.gram import (
    LayerProblem,
    make_problem,
    objective,
    refit,
    relative_error,
    support_inverse,
)
from slmserve.prune.osscar import (
    add_back_gains,
    best_single_swap,
    osscar,
    removal_costs,
    remove_groups,
)

F64 = torch.float64


def layer(
    seed: int, d_in: int = 12, d_out: int = 6, tokens: int = 256, mix: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs with uneven scales (as real activations are) and random weights."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(d_in, dtype=F64) + mix * torch.randn(d_in, d_in, generator=g, dtype=F64)
    scale = 2 * torch.rand(d_in, generator=g, dtype=F64)
    x = torch.randn(tokens, d_in, generator=g, dtype=F64) @ mixing * scale
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    return x, w


def mask(groups: int, kept: list[int] | tuple[int, ...]) -> torch.Tensor:
    m = torch.zeros(groups, dtype=torch.bool)
    m[list(kept)] = True
    return m


def direct_objective(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: float) -> float:
    """½‖X B − X B̂‖² + ½ λ‖B − B̂‖², straight from the tokens."""
    d = b - w.t()
    return 0.5 * float((x @ d).pow(2).sum()) + 0.5 * lam * float(d.pow(2).sum())


def test_objective_equals_the_direct_reconstruction_error() -> None:
    x, w = layer(0)
    p = make_problem(x.t() @ x, w, 1, damping=0.01)
    lam = 0.01 * float((x.t() @ x).diagonal().mean())
    b = torch.randn(12, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert objective(p, b) == pytest.approx(direct_objective(x, w, b, lam), rel=1e-10)
    assert objective(p, p.dense) == 0.0


def test_refit_is_the_least_squares_optimum_on_its_support() -> None:
    x, w = layer(1)
    p = make_problem(x.t() @ x, w, 1)
    keep = mask(12, [0, 2, 3, 7, 8, 11])
    b = refit(p, keep)
    rows = p.rows(keep)
    assert torch.all(b[~rows] == 0)
    grad = p.hessian @ b - p.target  # zero on the support at the optimum
    assert grad[rows].abs().max() < 1e-9 * p.target.abs().max()
    # the same optimum from an augmented least-squares solve on the tokens
    lam = 0.01 * float((x.t() @ x).diagonal().mean())
    xs = torch.cat([x[:, rows], lam**0.5 * torch.eye(int(rows.sum()), dtype=F64)])
    ys = torch.cat([x @ w.t(), lam**0.5 * w.t()[rows]])
    torch.testing.assert_close(b[rows], torch.linalg.lstsq(xs, ys).solution)


def test_keeping_everything_returns_the_dense_weights() -> None:
    x, w = layer(2)
    p = make_problem(x.t() @ x, w, 1)
    torch.testing.assert_close(refit(p, mask(12, range(12))), w.t())
    sol = osscar(p, 12)
    assert sol.keep.all() and sol.objective == pytest.approx(0.0, abs=1e-9)


def test_dead_inputs_are_zeroed_and_free_to_remove() -> None:
    x, w = layer(3)
    x[:, 4] = 0.0
    p = make_problem(x.t() @ x, w, 1)
    assert torch.all(p.dense[4] == 0)
    costs = removal_costs(p.dense, support_inverse(p, mask(12, range(12))), mask(12, range(12)), 1)
    assert costs[4] == 0.0 and costs.argmin() == 4


@pytest.mark.parametrize("k", [1, 3])
def test_removal_cost_is_the_exact_objective_increase(k: int) -> None:
    x, w = layer(4, d_in=12)
    p = make_problem(x.t() @ x, w, k)
    n = p.num_groups
    alive = mask(n, [g for g in range(n) if g != 1])  # start from a pruned support
    b, hinv = refit(p, alive), support_inverse(p, alive)
    costs = removal_costs(b, hinv, alive, k)
    assert costs[1] == torch.inf
    for g in range(n):
        if g == 1:
            continue
        smaller = alive.clone()
        smaller[g] = False
        exact = objective(p, refit(p, smaller)) - objective(p, b)
        assert float(costs[g]) == pytest.approx(exact, rel=1e-8)


@pytest.mark.parametrize(("k", "update_iter"), [(1, 1), (1, 3), (2, 2)])
def test_rank_k_update_and_downdate_equal_a_from_scratch_solve(k: int, update_iter: int) -> None:
    x, w = layer(5, d_in=12)
    p = make_problem(x.t() @ x, w, k)
    n = p.num_groups
    full = mask(n, range(n))
    b, hinv, alive = remove_groups(p, p.dense, support_inverse(p, full), full, 3, update_iter)
    assert int(alive.sum()) == n - 3
    torch.testing.assert_close(b, refit(p, alive), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(hinv, support_inverse(p, alive), rtol=1e-9, atol=1e-10)
    if k == 1 and update_iter == 1:
        # Single-neuron steps update in place by v vᵀ and never re-symmetrise: the inverse
        # must stay exactly symmetric by construction.
        assert torch.equal(hinv, hinv.t())


@pytest.mark.parametrize("k", [1, 2])
def test_add_back_gain_is_the_exact_objective_decrease(k: int) -> None:
    x, w = layer(6, d_in=12)
    p = make_problem(x.t() @ x, w, k)
    n = p.num_groups
    alive = mask(n, range(0, n, 2))
    b, hinv = refit(p, alive), support_inverse(p, alive)
    gains = add_back_gains(p, b, hinv, alive)
    for g in range(n):
        if alive[g]:
            assert gains[g] == -torch.inf
            continue
        bigger = alive.clone()
        bigger[g] = True
        exact = objective(p, b) - objective(p, refit(p, bigger))
        assert float(gains[g]) == pytest.approx(exact, rel=1e-8)


def brute_force(p: LayerProblem, keep: int) -> float:
    """Smallest objective over all supports of ``keep`` groups (k = 1), batched."""
    idx = torch.tensor(list(itertools.combinations(range(p.num_groups), keep)))
    h = p.hessian[idx[:, :, None], idx[:, None, :]]
    g = p.target[idx]
    b = torch.linalg.solve(h, g)
    const = 0.5 * float((p.dense * p.target).sum())
    return const - 0.5 * float((g * b).sum((1, 2)).max())


def swap_improves(p: LayerProblem, keep: torch.Tensor) -> bool:
    """Does any one-for-one swap lower the objective (checked by refitting every pair)?"""
    f = objective(p, refit(p, keep))
    for i in keep.nonzero().flatten().tolist():
        for j in (~keep).nonzero().flatten().tolist():
            other = keep.clone()
            other[i], other[j] = False, True
            if objective(p, refit(p, other)) < f * (1 - 1e-9):
                return True
    return False


def test_best_single_swap_matches_trying_every_pair() -> None:
    for seed in range(4):
        x, w = layer(seed)
        p = make_problem(x.t() @ x, w, 1)
        alive = mask(12, [0, 2, 4, 6, 8, 10])
        b, hinv = refit(p, alive), support_inverse(p, alive)
        out, into, change = best_single_swap(p, b, hinv, alive)
        assert alive[out] and not alive[into]
        other = alive.clone()
        other[out], other[into] = False, True
        assert change == pytest.approx(objective(p, refit(p, other)) - objective(p, b), rel=1e-8)
        for i in range(0, 12, 2):
            for j in range(1, 12, 2):
                trial = alive.clone()
                trial[i], trial[j] = False, True
                assert objective(p, refit(p, trial)) >= objective(p, b) + change - 1e-6


def test_osscar_with_local_search_against_the_brute_force_optimum() -> None:
    """12 inputs, keep 6 (924 supports), 24 correlated problems with uneven input scales.

    OSSCAR is a heuristic and guarantees no optimum. What it does guarantee after local search
    is a support no single swap improves; beyond that the stated targets (measured: 19/24
    exact, mean gap 2.6%, greedy alone 14/24) are: the optimum on at least 18 of 24, mean
    relative gap under 4%, more optima than greedy alone, never worse than greedy; and
    magnitude (with or without refit) never better than the optimum and far worse on average.
    """
    exact = greedy_exact = 0
    gaps, mag_gaps = [], []
    for seed in range(24):
        x, w = layer(seed)
        p = make_problem(x.t() @ x, w, 1)
        best = brute_force(p, 6)
        greedy = osscar(p, 6)
        local = osscar(p, 6, local=True)
        assert int(local.keep.sum()) == 6
        assert local.objective <= greedy.objective * (1 + 1e-9)
        assert local.objective >= best * (1 - 1e-9)
        assert not swap_improves(p, local.keep)
        gaps.append(local.objective / best - 1)
        exact += gaps[-1] < 1e-9
        greedy_exact += greedy.objective / best - 1 < 1e-9
        for refit_weights in (False, True):
            mag = baselines.magnitude(p, 6, refit_weights=refit_weights).objective
            assert mag >= best * (1 - 1e-9)
        mag_gaps.append(baselines.magnitude(p, 6, refit_weights=True).objective / best - 1)
    assert exact >= 18, gaps
    assert exact > greedy_exact
    assert sum(gaps) / len(gaps) < 0.04
    assert sum(mag_gaps) / len(mag_gaps) > 10 * sum(gaps) / len(gaps)


def test_baselines_select_by_their_scores() -> None:
    x, w = layer(7)
    w[:, 3] *= 100  # the largest column by far
    x[:, 5] *= 0.0  # a column that never fires
    p = make_problem(x.t() @ x, w, 1)
    mag = baselines.magnitude(p, 1, refit_weights=False)
    assert mag.keep.nonzero().tolist() == [[3]]
    torch.testing.assert_close(mag.weight[3], p.dense[3])
    wanda = baselines.wanda(p, 11, (x.t() @ x).diagonal())
    assert not wanda.keep[5] and int(wanda.keep.sum()) == 11


def test_relative_error_is_the_output_error_on_the_tokens() -> None:
    x, w = layer(8)
    pruned = w.clone()
    pruned[:, :4] = 0
    want = float((x @ (w - pruned).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())
    assert relative_error(x.t() @ x, w, pruned) == pytest.approx(want, rel=1e-10)


def test_bad_problems_are_refused() -> None:
    x, w = layer(9)
    with pytest.raises(ValueError, match="does not divide"):
        make_problem(x.t() @ x, w, 5)
    with pytest.raises(ValueError, match="Gram matrix shape"):
        make_problem(torch.eye(3), w, 1)
    with pytest.raises(ValueError, match="keep_count"):
        osscar(make_problem(x.t() @ x, w, 1), 0)
