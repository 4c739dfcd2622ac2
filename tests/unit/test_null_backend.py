"""The ``null`` backend's stand-in device: what each forward costs it, in launch order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slmserve.models import null
from slmserve.models.null import NullBackend


def test_each_forward_occupies_the_device_after_the_one_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(null.time, "perf_counter", lambda: 100.0)
    backend = NullBackend(list(range(300)), device_seconds_per_token=0.5,
                          device_seconds_per_step=2.0)  # fmt: skip
    batch = SimpleNamespace(input_ids=torch.tensor([7, 8, 9]), logit_indices=torch.tensor([2]))
    hidden = backend.forward(batch, kv=None)  # type: ignore[arg-type]
    assert backend._device_free_at == 100.0 + 2.0 + 3 * 0.5
    backend.forward(batch, kv=None)  # type: ignore[arg-type]  # queued behind the first
    assert backend._device_free_at == 100.0 + 2 * 3.5
    assert backend.logits(hidden).argmax(-1).tolist() == [10]  # next token: input + 1


@pytest.mark.parametrize("option", ["device_seconds_per_token", "device_seconds_per_step"])
def test_a_negative_device_time_is_refused(option: str) -> None:
    with pytest.raises(ValueError, match=f"{option} must be >= 0"):
        NullBackend(list(range(300)), **{option: -1.0})
