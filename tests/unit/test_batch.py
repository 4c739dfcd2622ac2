"""``flatten``: a step plan as flat ids, positions, slots and logit rows."""

from __future__ import annotations

import numpy as np

from slmserve.engine.batch import flatten
from slmserve.engine.core import ScheduledSeq, StepPlan
from slmserve.engine.sequence import Sequence
from slmserve.types import SamplingParams


def _item(prompt: list[int], start: int, n: int, *, sample: bool, future: bool = False,
          prompt_logprobs: int | None = None) -> ScheduledSeq:  # fmt: skip
    seq = Sequence("r", prompt, SamplingParams(prompt_logprobs=prompt_logprobs),
                   arrival_time=0.0, client_id="c", eos_ids=frozenset())  # fmt: skip
    slots = np.arange(100 + start, 100 + start + n)
    context = np.arange(100, 100 + start + n)
    return ScheduledSeq(seq, start, n, slots, context, sample, future)


def test_logit_rows_ids_and_positions_of_a_mixed_step() -> None:
    items = [
        _item([1, 2, 3, 4, 5], 0, 3, sample=False),  # a prompt chunk: no logits
        _item([6, 7, 8], 1, 2, sample=True),  # the rest of a prompt: its last token
        _item([9, 10, 11, 12], 0, 4, sample=True, prompt_logprobs=1),  # every token
        _item([13, 14], 2, 1, sample=True, future=True),  # a decode of a token in flight
    ]
    host = flatten(StepPlan(0.0, items))
    ids, positions, out_slots, cu_new, context, cu_ctx, logit_indices = host.arrays
    assert ids.tolist() == [1, 2, 3, 7, 8, 9, 10, 11, 12, 0]
    assert positions.tolist() == [0, 1, 2, 1, 2, 0, 1, 2, 3, 2]
    assert cu_new.tolist() == [0, 3, 5, 9, 10] and cu_ctx.tolist() == [0, 3, 6, 10, 13]
    assert out_slots.tolist() == [100, 101, 102, 101, 102, 100, 101, 102, 103, 102]
    assert len(context) == 13
    assert logit_indices.tolist() == [4, 5, 6, 7, 8, 9]
    assert host.ranges == [(0, 0), (0, 1), (1, 4), (5, 1)]
