"""OSSCAR's combinatorial solver for one layer (Meng et al., ICML 2024, §3.2 of our notes).

Stage A, greedy backward elimination: starting from all groups, repeatedly drop the groups
whose removal raises the objective least, using the block Optimal-Brain-Surgeon cost
``Δ_g = ½ tr(B_gᵀ [H⁻¹_gg]⁻¹ B_g)`` on the current support; after each drop the remaining
weights take the optimal rank-k correction ``B ← B − H⁻¹[:,U] (H⁻¹_UU)⁻¹ B_U`` and the inverse
is downdated by the same Schur complement, so no step re-inverts ``H``.

Stage B, local search (optional): drop ``t`` more groups the same way, add back the ``t``
pruned groups with the largest gain ``½ tr(r_gᵀ C_g⁻¹ r_g)`` (``C_g`` the Schur complement of
``H_gg``, ``r_g`` the residual gradient), refit exactly, and keep the swap only if the objective
strictly decreases; otherwise halve ``t``. The answer is always an exact refit on the best
support found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmserve.prune.gram import LayerProblem, objective, refit, support_inverse

REL_TOL = 1e-9
"""A swap must lower the objective by more than this fraction to count as an improvement."""


@dataclass(frozen=True, slots=True)
class Solution:
    """The kept groups (``[G]`` bool), the refitted ``B`` (``d_in × d_out``) and ``f(B)``."""

    keep: torch.Tensor
    weight: torch.Tensor
    objective: float


def _blocks(m: torch.Tensor, k: int) -> torch.Tensor:
    """Diagonal ``k × k`` blocks of a ``(G·k) × (G·k)`` matrix as ``[G, k, k]``."""
    g = m.shape[0] // k
    return m.reshape(g, k, g, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _solve_left(rhs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ rhs`` (argument order of ``torch.div``)."""
    return torch.linalg.solve(a, rhs)


def removal_costs(b: torch.Tensor, hinv: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """``Δ_g = ½ tr(B_gᵀ [H⁻¹_gg]⁻¹ B_g)`` for every group; ``inf`` for groups already gone."""
    if k == 1:
        d = hinv.diagonal().clamp_min(torch.finfo(hinv.dtype).tiny)
        cost = 0.5 * b.pow(2).sum(1) / d
    else:
        blocks = _blocks(hinv, k)
        eye = torch.eye(k, dtype=hinv.dtype, device=hinv.device)
        blocks = torch.where(alive[:, None, None], blocks, eye)
        bg = b.reshape(-1, k, b.shape[1])
        cost = 0.5 * (bg * torch.linalg.solve(blocks, bg)).sum((1, 2))
    return cost.masked_fill(~alive, torch.inf)


def remove_groups(
    p: LayerProblem,
    b: torch.Tensor,
    hinv: torch.Tensor,
    alive: torch.Tensor,
    count: int,
    update_iter: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop ``count`` groups greedily, ``update_iter`` per step; returns new ``(B, H⁻¹, alive)``.

    ``B`` must be the exact refit on ``alive`` and ``hinv`` the inverse of ``H`` on ``alive``
    (zero elsewhere); both stay so after each step.
    """
    k = p.group_size
    b, hinv, alive = b.clone(), hinv.clone(), alive.clone()
    removed = 0
    while removed < count:
        step = min(update_iter, count - removed)
        chosen = removal_costs(b, hinv, alive, k).topk(step, largest=False).indices
        rows = (chosen[:, None] * k + torch.arange(k, device=b.device)).reshape(-1)
        if len(rows) == 1:
            # One row (an MLP neuron per step) is the common case and the hot loop: two
            # in-place rank-1 updates. v vᵀ with v = H⁻¹[:, i] / √H⁻¹_ii is exactly symmetric,
            # so the inverse needs no re-symmetrising.
            u = hinv[:, rows[0]].clone()
            c = u[rows[0]].clamp_min(torch.finfo(u.dtype).tiny)
            b.sub_(torch.outer(u, b[rows[0]] / c))
            v = u / c.sqrt()
            hinv.sub_(torch.outer(v, v))
        else:
            h_uu = hinv[rows][:, rows]
            h_u = hinv[:, rows]
            b = b - h_u @ _solve_left(b[rows], h_uu)
            hinv = hinv - h_u @ _solve_left(hinv[rows], h_uu)
            hinv = 0.5 * (hinv + hinv.t())  # keep it symmetric against rounding drift
        b[rows] = 0.0
        hinv[rows] = 0.0
        hinv[:, rows] = 0.0
        alive[chosen] = False
        removed += step
    return b, hinv, alive


def add_back_gains(
    p: LayerProblem, b: torch.Tensor, hinv: torch.Tensor, alive: torch.Tensor
) -> torch.Tensor:
    """Objective decrease from re-adding each pruned group alone; ``-inf`` for alive groups.

    ``C_g = H_gg − H_gS H_SS⁻¹ H_Sg`` and ``r_g = G_g − H_gS B_S``; gain ``½ tr(r_gᵀ C_g⁻¹ r_g)``.
    """
    k, h = p.group_size, p.hessian
    resid = p.target - h @ b
    proj = h @ hinv  # rows g: H_gS H_SS⁻¹
    g = p.num_groups
    schur = _blocks(h, k) - torch.einsum(
        "gid,gjd->gij", proj.reshape(g, k, -1), h.reshape(g, k, -1)
    )
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    schur = torch.where(alive[:, None, None], eye, schur)
    rg = resid.reshape(g, k, -1)
    gain = 0.5 * (rg * torch.linalg.solve(schur, rg)).sum((1, 2))
    return gain.masked_fill(alive, -torch.inf)


def best_single_swap(
    p: LayerProblem, b: torch.Tensor, hinv: torch.Tensor, alive: torch.Tensor
) -> tuple[int, int, float]:
    """Exact best one-for-one swap for single-input groups: ``(out, in, change of f)``.

    Dropping ``i`` downdates ``H⁻¹`` by ``u uᵀ / c`` (``u = H⁻¹[:, i]``, ``c = H⁻¹_ii``), which
    moves every pruned ``j``'s Schur complement to ``C_j + P_ji² / c`` and its residual to
    ``r_j + P_ji b_i / c`` (``P = H H⁻¹``). So the gain of re-adding ``j`` after dropping ``i``
    is known in closed form for every pair at once, from one ``d_in × d_in`` product.
    """
    h = p.hessian
    proj = h @ hinv
    resid = p.target - h @ b
    c = hinv.diagonal().clamp_min(torch.finfo(h.dtype).tiny)[None, :]
    b_sq = b.pow(2).sum(1)[None, :]
    cost = 0.5 * b_sq / c  # dropping i alone
    schur = (h.diagonal() - (proj * h).sum(1))[:, None]
    num = resid.pow(2).sum(1)[:, None] + 2 * proj * (resid @ b.t()) / c + proj.pow(2) * b_sq / c**2
    change = cost - 0.5 * num / (schur + proj.pow(2) / c)  # [j in, i out]
    valid = (~alive)[:, None] & alive[None, :]
    change = change.masked_fill(~valid, torch.inf)
    flat = int(change.argmin())
    j, i = divmod(flat, change.shape[1])
    return i, j, float(change[j, i])


def local_search(
    p: LayerProblem,
    keep: torch.Tensor,
    *,
    swap_size: int,
    max_iter: int = 30,
    update_iter: int = 1,
) -> torch.Tensor:
    """Improve a support by swaps, accepting only strict improvements; returns ``keep``.

    Swaps of ``t`` groups (greedy out, best gains in) start at ``swap_size`` and halve on
    failure, as in the reference code. At ``t = 1`` with single-input groups (MLP neurons) the
    move is the exact best one-for-one swap over all pairs (:func:`best_single_swap`), which
    costs no more than one ``t``-swap and is what lets the search leave a greedy local optimum.
    """
    kept = int(keep.sum())
    t = max(0, min(swap_size, kept, p.num_groups - kept))
    best = keep.clone()
    best_f = objective(p, refit(p, best))
    for _ in range(max_iter):
        if t < 1:
            break
        b, hinv = refit(p, best), support_inverse(p, best)
        if t == 1 and p.group_size == 1:
            out, into, change = best_single_swap(p, b, hinv, best)
            if change >= -REL_TOL * abs(best_f):
                break
            alive = best.clone()
            alive[out], alive[into] = False, True
        else:
            b, hinv, alive = remove_groups(p, b, hinv, best, t, update_iter)
            gains = add_back_gains(p, b, hinv, alive)
            alive[gains.topk(t).indices] = True
        f = objective(p, refit(p, alive))
        if f < best_f - REL_TOL * abs(best_f) and not torch.equal(alive, best):
            best, best_f = alive, f
        else:
            t //= 2
    return best


def osscar(
    p: LayerProblem,
    keep_count: int,
    *,
    update_iter: int = 1,
    local: bool = False,
    swap_size: int = 10,
    local_iter: int = 30,
) -> Solution:
    """Keep ``keep_count`` of the ``G`` groups: greedy removal, optional local search, refit."""
    n = p.num_groups
    if not 1 <= keep_count <= n:
        raise ValueError(f"keep_count must be in [1, {n}], got {keep_count}")
    if update_iter < 1:
        raise ValueError(f"update_iter must be >= 1, got {update_iter}")
    alive = torch.ones(n, dtype=torch.bool, device=p.dense.device)
    hinv = support_inverse(p, alive)
    _, _, keep = remove_groups(p, p.dense, hinv, alive, n - keep_count, update_iter)
    if local:
        keep = local_search(
            p, keep, swap_size=swap_size, max_iter=local_iter, update_iter=update_iter
        )
    b = refit(p, keep)
    return Solution(keep, b, objective(p, b))
