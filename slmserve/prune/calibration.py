"""Calibration data: text files to token windows, and Gram matrices from forward hooks.

A calibration file is plain text (``.txt``: the whole file is one document) or JSON lines
(``.jsonl``: one document per line, a string or an object with a ``"text"`` string). Documents
are tokenized, joined with the EOS token into one stream, and cut into consecutive windows of
``seq_len`` tokens; ``samples`` of them are taken evenly spread over the stream. A last, shorter
window is padded, and :class:`GramCollector` leaves padding out of the statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class Windows:
    """Token windows ``ids [N, L]`` and ``mask [N, L]`` (True = real token, False = padding)."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def batches(self, size: int) -> list[Windows]:
        return [
            Windows(self.ids[i : i + size], self.mask[i : i + size])
            for i in range(0, len(self.ids), size)
        ]


def read_documents(path: str | Path) -> list[str]:
    """Documents of a ``.txt`` or ``.jsonl`` calibration file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            doc = record.get("text") if isinstance(record, dict) else record
            if not isinstance(doc, str):
                raise ValueError(f'{path}:{lineno}: expected a string or an object with "text"')
            docs.append(doc)
    elif path.suffix == ".txt":
        docs = [text]
    else:
        raise ValueError(f"calibration file must end in .txt or .jsonl, got {path.name!r}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"calibration file {path} holds no text")
    return docs


def token_stream(tokenizer: Any, docs: list[str]) -> list[int]:
    """All documents' token ids, separated by the EOS token when the tokenizer has one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(int(eos))
    return stream


def make_windows(stream: list[int], samples: int, seq_len: int, pad_id: int = 0) -> Windows:
    """Up to ``samples`` windows of ``seq_len`` tokens, evenly spread over ``stream``."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    if len(stream) < 2:
        raise ValueError("calibration text gives fewer than 2 tokens")
    starts = list(range(0, len(stream) - 1, seq_len))
    if len(starts) > samples:
        pick = torch.linspace(0, len(starts) - 1, samples).round().long().tolist()
        starts = [starts[i] for i in pick]
    ids = torch.full((len(starts), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(starts), seq_len, dtype=torch.bool)
    for row, s in enumerate(starts):
        chunk = stream[s : s + seq_len]
        ids[row, : len(chunk)] = torch.tensor(chunk)
        mask[row, : len(chunk)] = True
    return Windows(ids, mask)


class GramCollector:
    """Accumulates ``XᵀX`` (float64) of one module's input over the unmasked tokens.

    Set :attr:`mask` (``[batch, seq]`` bool) before each forward call through the module.
    """

    def __init__(self, module: nn.Module) -> None:
        d_in = module.in_features
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=module.weight.device)
        self.tokens = 0
        self.mask: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: Any) -> None:
        x = args[0]
        x = x[self.mask] if self.mask is not None else x.reshape(-1, x.shape[-1])
        x = x.to(torch.float64)
        self.gram += x.t() @ x
        self.tokens += x.shape[0]

    def close(self) -> torch.Tensor:
        """Remove the hook; return the Gram matrix."""
        self._handle.remove()
        return self.gram
