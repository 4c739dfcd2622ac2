"""CUDA graphs of the decode forward at common batch sizes (captured once, at start-up).

A decode step of a small model is dominated by kernel launches (28 layers x ~15 kernels);
replaying a captured graph issues them all at once. The graph reads its inputs from static
buffers, so a step copies its batch into them and pads it to the next captured size:

* padding rows get slot ``-1`` (the Triton KV store skips them) and an empty context (the decode
  kernel returns zeros for them), so they touch no pool slot and no real row;
* ``context_slots`` is one flat buffer of ``ctx_capacity`` entries; a step whose contexts do
  not fit runs eagerly instead.

Only backends that declare ``supports_cuda_graphs`` are captured: their decode forward must have
no host synchronisation and no shape that depends on the data (true for the native decoder on
its Triton path, whose kernel grids depend only on the batch size).
"""

from __future__ import annotations

from typing import Any

import torch

from slmserve.interfaces import ForwardBatch


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch`` (and ``max_batch`` itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += range(16, max_batch + 1, 16)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Static decode inputs and, with ``capture=True`` (CUDA only), one graph per batch size.

    ``capture=False`` keeps only the buffers and the padding: tests use it on the CPU to check
    that a padded batch computes what the unpadded one does.
    """

    def __init__(
        self,
        backend: Any,
        kv: Any,
        *,
        max_batch: int,
        max_ctx: int,
        ctx_capacity: int,
        capture: bool = True,
    ) -> None:
        self.backend, self.kv = backend, kv
        self.sizes = graph_batch_sizes(max_batch)
        self.max_ctx = max_ctx  # an upper bound on any context: sizes the decode kernel's splits
        self.ctx_capacity = ctx_capacity
        size = self.sizes[-1]
        dev = kv.device

        def ints(n: int, fill: int = 0) -> torch.Tensor:
            return torch.full((n,), fill, dtype=torch.int64, device=dev)

        self.input_ids = ints(size)
        self.positions = ints(size)
        self.out_slots = ints(size, -1)
        self.cu_new = torch.arange(size + 1, dtype=torch.int64, device=dev)
        self.context_slots = ints(ctx_capacity)
        self.cu_ctx = ints(size + 1)
        self.logit_indices = torch.arange(size, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps served by a graph (tests and logs read it)
        if capture:
            self._capture()

    def _static(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            out_slots=self.out_slots[:size],
            cu_new=self.cu_new[: size + 1],
            context_slots=self.context_slots,
            cu_ctx=self.cu_ctx[: size + 1],
            logit_indices=self.logit_indices[:size],
            new_lens=[1] * size,
            ctx_lens=[self.max_ctx] * size,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest size first, so the smaller graphs reuse its memory pool."""
        pool = None
        for size in reversed(self.sizes):
            batch = self._static(size)  # every row is padding: nothing is written to the pool
            self.backend.forward(batch, self.kv)  # warm-up: compiles kernels, sets up cuBLAS
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.backend.forward(batch, self.kv)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, batch: ForwardBatch) -> bool:
        """Host-side check: a decode-only batch within the captured sizes and buffers."""
        return (
            0 < batch.num_seqs <= self.sizes[-1]
            and all(n == 1 for n in batch.new_lens)
            and sum(batch.ctx_lens) <= self.ctx_capacity
            and max(batch.ctx_lens) <= self.max_ctx
            and batch.logit_indices.shape[0] == batch.num_seqs
        )

    def padded(self, batch: ForwardBatch) -> ForwardBatch:
        """Copy ``batch`` into the static buffers; the static batch of the next captured size."""
        n = batch.num_seqs
        size = next(s for s in self.sizes if s >= n)
        total = sum(batch.ctx_lens)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_slots[:n].copy_(batch.out_slots)
        self.context_slots[:total].copy_(batch.context_slots)
        self.cu_ctx[: n + 1].copy_(batch.cu_ctx)
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.out_slots[n:size].fill_(-1)
            self.cu_ctx[n + 1 : size + 1].fill_(total)  # empty contexts
        return self._static(size)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the graph for ``batch`` (which must :meth:`fit`); hidden states ``[B, H]``.

        The result is a view of the graph's output buffer: read it before the next replay.
        """
        size = self.padded(batch).num_seqs
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][: batch.num_seqs]
