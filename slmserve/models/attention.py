"""Attention over KV-pool slots: the torch reference path, and the switch to the Triton path.

:func:`plan_attention` turns a :class:`~slmserve.interfaces.ForwardBatch` into index tensors
once per step; :func:`write_kv` and :func:`attend` then run every layer with them. The backend
is chosen once, at load time, by :func:`resolve_backend`: ``"triton"`` (the kernels in
:mod:`slmserve.kernels`, planned by :mod:`slmserve.kernels.attention`) on CUDA when triton is
importable, ``"torch"`` (this module) elsewhere.

The torch path:

* Decode sequences (exactly one new token) run as ONE batched SDPA call: their contexts are
  gathered from the pool, padded to the longest, and masked. GQA is handled without copying K/V
  by folding the query heads of a group into SDPA's query-length axis.
* Sequences with several new tokens (prefill or extend chunks) are grouped by size and each
  group runs as ONE padded SDPA call, with a mask that lets new token ``j`` see context entries
  ``[0, ctx - new + j]``. Scoring puts dozens of item extends in one step; one call per group
  instead of per sequence is what makes that step cheap. A group only grows while its padded
  attention area stays within :data:`PAD_SLACK` of the real one, so mixing a long chunk with
  short ones never multiplies the work.

Every index is built on the device from ``batch`` tensors; host-side ``new_lens``/``ctx_lens``
only size the buffers, so a step needs no host<->device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from slmserve.interfaces import ForwardBatch

if TYPE_CHECKING:
    from slmserve.kernels.attention import TritonPlan

ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA with triton importable, else ``"torch"``.

    Asking for ``"triton"`` where it cannot run is an error; on CPU it runs only under the
    Triton interpreter (``TRITON_INTERPRET=1``), which is for tests.
    """
    from slmserve.kernels import interpreter_enabled, triton_available

    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; valid: {', '.join(ATTENTION_BACKENDS)}"
        )
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ValueError("attention backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"attention backend 'triton' needs a CUDA device, not {device.type!r} "
                "(or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter, for tests)"
            )
    return name


PAD_SLACK = 1.25
"""A prefill group may cost at most this much more attention area than its sequences need."""


@dataclass(slots=True)
class PrefillGroup:
    """Sequences with several new tokens, padded to one ``[G, new, ctx]`` attention call."""

    rows: torch.Tensor  # [G, max_new] flat new-token rows (padding repeats the last row)
    slots: torch.Tensor  # [G, max_ctx] pool slots of each context (padding -> slot 0)
    mask: torch.Tensor  # [G, 1, max_new, max_ctx] bool, True = attend
    src: torch.Tensor  # [sum new] positions in the flattened [G * max_new] output ...
    dst: torch.Tensor  # [sum new] ... and the flat rows they are written to
    folded: dict[int, torch.Tensor] = field(default_factory=dict)

    def folded_mask(self, group: int) -> torch.Tensor:
        """The mask with the query axis repeated ``group`` times (GQA heads folded into it);
        made once per step and GQA ratio, not once per layer."""
        if group not in self.folded:
            self.folded[group] = self.mask.repeat(1, 1, group, 1)
        return self.folded[group]


@dataclass(slots=True)
class AttentionPlan:
    """Per-step indices shared by all layers (built once by :func:`plan_attention`)."""

    batch: ForwardBatch
    decode_rows: torch.Tensor | None = None  # [Bd] flat rows of the decode tokens
    decode_slots: torch.Tensor | None = None  # [Bd, max_ctx] pool slots (padding -> a valid slot)
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_ctx] bool, True = attend
    prefills: list[PrefillGroup] = field(default_factory=list)


def plan_attention(batch: ForwardBatch, backend: str = "torch") -> AttentionPlan | TritonPlan:
    """Build the gather indices and masks for one step (no host<->device sync).

    ``backend`` is a name resolved by :func:`resolve_backend` (``"torch"`` or ``"triton"``).
    """
    if backend == "triton":
        from slmserve.kernels.attention import plan_triton

        return plan_triton(batch)
    plan = AttentionPlan(batch)
    new_lens, ctx_lens = batch.new_lens, batch.ctx_lens
    cu_new = [0, *accumulate(new_lens)]
    cu_ctx = [0, *accumulate(ctx_lens)]
    device = batch.input_ids.device
    decode = [i for i, n in enumerate(new_lens) if n == 1]
    if decode:
        n_dec = len(decode)
        if n_dec == len(new_lens):
            seq = torch.arange(n_dec, device=device)
        else:
            # Stable sort puts the decode sequences first, in batch order; the count is known
            # on the host, so no nonzero() (which would sync) is needed.
            counts = batch.cu_new[1:] - batch.cu_new[:-1]
            seq = torch.argsort((counts != 1).to(torch.int8), stable=True)[:n_dec]
        max_ctx = max(ctx_lens[i] for i in decode)
        starts = batch.cu_ctx[seq]
        lens = batch.cu_ctx[seq + 1] - starts
        offs = torch.arange(max_ctx, device=device)
        valid = offs[None, :] < lens[:, None]
        flat = torch.where(valid, starts[:, None] + offs[None, :], starts[:, None])
        plan.decode_rows = batch.cu_new[seq]
        plan.decode_slots = batch.context_slots[flat]
        plan.decode_mask = valid[:, None, None, :]
    multi = [i for i, n in enumerate(new_lens) if n >= 2]
    for i in multi:
        if ctx_lens[i] < new_lens[i]:
            raise ValueError(
                f"sequence {i}: context ({ctx_lens[i]}) shorter than its new tokens ({new_lens[i]})"
            )
    for members in _group_by_size(multi, new_lens, ctx_lens):
        plan.prefills.append(_prefill_group(batch, members, cu_new, cu_ctx))
    return plan


def _group_by_size(seqs: list[int], new_lens: list[int], ctx_lens: list[int]) -> list[list[int]]:
    """Greedy buckets, largest first: add a sequence while padding stays within PAD_SLACK."""
    order = sorted(seqs, key=lambda i: (new_lens[i], ctx_lens[i]), reverse=True)
    groups: list[list[int]] = []
    area = max_new = max_ctx = 0
    for i in order:
        n, c = new_lens[i], ctx_lens[i]
        if groups:
            grown = (len(groups[-1]) + 1) * max(max_new, n) * max(max_ctx, c)
            if grown <= PAD_SLACK * (area + n * c):
                groups[-1].append(i)
                area += n * c
                max_new, max_ctx = max(max_new, n), max(max_ctx, c)
                continue
        groups.append([i])
        area, max_new, max_ctx = n * c, n, c
    return groups


def _prefill_group(
    batch: ForwardBatch, members: list[int], cu_new: list[int], cu_ctx: list[int]
) -> PrefillGroup:
    """Index tensors of one padded group, built from host offsets and device slices (no sync)."""
    device = batch.input_ids.device
    new = [cu_new[i + 1] - cu_new[i] for i in members]
    ctx = [cu_ctx[i + 1] - cu_ctx[i] for i in members]
    max_new, max_ctx = max(new), max(ctx)
    j = torch.arange(max_new, device=device)
    pos = torch.arange(max_ctx, device=device)
    rows, slots, masks, src, dst = [], [], [], [], []
    for g, (i, n, c) in enumerate(zip(members, new, ctx)):
        rows.append(j.clamp(max=n - 1) + cu_new[i])
        slots.append(F.pad(batch.context_slots[cu_ctx[i] : cu_ctx[i + 1]], (0, max_ctx - c)))
        # Query j sits at position c - n + j; padded queries (j >= n) see the whole context,
        # so no row is fully masked (SDPA would return NaN) and their output is dropped.
        masks.append((pos[None, :] <= (c - n + j)[:, None]) & (pos < c)[None, :])
        src.append(torch.arange(n, device=device) + g * max_new)
        dst.append(torch.arange(cu_new[i], cu_new[i] + n, device=device))
    mask = torch.stack(masks)[:, None]
    return PrefillGroup(torch.stack(rows), torch.stack(slots), mask, torch.cat(src), torch.cat(dst))


def write_kv(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan | TritonPlan,
) -> None:
    """Store the new tokens' keys and values at ``plan.batch.out_slots`` (cast to the pool's
    dtype)."""
    if not isinstance(plan, AttentionPlan):
        plan.write_kv(k_pool, v_pool, k, v)
        return
    k_pool.index_copy_(0, plan.batch.out_slots, k.to(k_pool.dtype))
    v_pool.index_copy_(0, plan.batch.out_slots, v.to(v_pool.dtype))


def attend(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: AttentionPlan | TritonPlan,
    scale: float,
) -> torch.Tensor:
    """Attention of the new tokens over their contexts in the pool.

    :param q: ``[T, heads, head_dim]`` queries (rope applied), flat over the batch.
    :param k_pool: ``[num_slots, kv_heads, head_dim]``; already holds this step's new keys.
    :param v_pool: same for values.
    :returns: ``[T, heads, head_dim]``.
    """
    if not isinstance(plan, AttentionPlan):
        return plan.attend(q, k_pool, v_pool, scale)
    heads, head_dim = q.shape[1:]
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        rows = plan.decode_rows
        # [Bd, kv_heads, group, D]: the group's query heads act as SDPA's query axis.
        qd = q[rows].view(-1, kv_heads, group, head_dim)
        k = _gather(k_pool, plan.decode_slots).to(q.dtype).transpose(1, 2)  # [Bd, kv, ctx, D]
        v = _gather(v_pool, plan.decode_slots).to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=plan.decode_mask, scale=scale)
        out[rows] = o.reshape(-1, heads, head_dim)
    for part in plan.prefills:
        size, max_new = part.rows.shape
        # [G, kv_heads, group * max_new, D]: query heads of a KV group folded into the query
        # axis (as for decode), so K/V are read once per KV head, never expanded.
        qp = q[part.rows].view(size, max_new, kv_heads, group, head_dim)
        qp = qp.permute(0, 2, 3, 1, 4).reshape(size, kv_heads, group * max_new, head_dim)
        k = _gather(k_pool, part.slots).to(q.dtype).transpose(1, 2)  # [G, kv, ctx, D]
        v = _gather(v_pool, part.slots).to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=part.folded_mask(group), scale=scale)
        o = o.view(size, kv_heads, group, max_new, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(size * max_new, heads, head_dim)
        out.index_copy_(0, part.dst, o.index_select(0, part.src))
    return out


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``pool[slots]`` via ``index_select`` on the flat index: about 2x faster on CPU."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])
