"""Load a transformers-format checkpoint directory into the native decoder.

A directory holds ``config.json``, the weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, and tokenizer files readable by ``AutoTokenizer``.
``generation_config.json`` is optional (extra EOS ids). Nothing is downloaded: ``path`` is
always a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from slmserve.cache.kv_pool import KVPool
from slmserve.interfaces import ForwardBatch, ModelBackend, ModelInfo, PluginError
from slmserve.models.decoder import ARCHITECTURES, Decoder, DecoderConfig

SUPPORTED = ", ".join(ARCHITECTURES)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class UnsupportedModelError(PluginError, ValueError):
    """The checkpoint is not an architecture the native backend runs."""


class NativeBackend(ModelBackend):
    """:class:`~slmserve.interfaces.ModelBackend` over the native torch decoder."""

    name = "native"

    def __init__(self, decoder: Decoder, tokenizer: Any, info: ModelInfo) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.info = info
        weight = decoder.model.embed_tokens.weight
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype

    @property
    def supports_cuda_graphs(self) -> bool:
        """A decode step can be captured in a CUDA graph and replayed with other inputs: true
        on the Triton path, whose shapes never depend on context lengths."""
        return self.device.type == "cuda" and self.decoder.attention == "triton"

    def forward(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        return self.decoder(batch, kv)

    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.logits(hidden, vocab_ids)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for an absent CUDA is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere (the checkpoint's dtype is ignored:
    bf16 matmuls on CPU are slow and less exact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        valid = ", ".join(["auto", *_DTYPES])
        raise ValueError(f"unknown dtype {dtype!r}; valid: {valid}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, checked to be a supported architecture."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"config.json not found in model directory {str(path)!r}")
    cfg = json.loads(config_file.read_text())
    model_type = cfg.get("model_type")
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    arch = (cfg.get("architectures") or [None])[0] or by_type.get(model_type)
    if arch not in ARCHITECTURES:
        found = arch or f"model_type {model_type!r}"
        raise UnsupportedModelError(
            f"unsupported architecture {found} in {config_file}; supported: {SUPPORTED}"
        )
    if model_type not in (None, ARCHITECTURES[arch]):
        raise UnsupportedModelError(
            f"{config_file}: architecture {arch} does not match model_type {model_type!r}"
        )
    cfg["architectures"] = [arch]
    cfg["model_type"] = ARCHITECTURES[arch]
    return cfg


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"weight shards {', '.join(missing)} listed in {index.name} are missing "
                f"from {str(path)!r}"
            )
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {str(path)!r} "
        "(only safetensors weights are supported)"
    )


def load_state(files: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Read tensors one by one, cast to ``dtype`` and move to ``device``."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = fh.get_tensor(key).to(device)  # cast on the device: faster on a GPU
                state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


def eos_ids(path: Path, cfg: dict[str, Any], tokenizer: Any) -> list[int]:
    """EOS ids from config.json and generation_config.json (tokenizer's as the fallback)."""
    found: list[int] = []
    sources = [cfg.get("eos_token_id")]
    gen = path / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        for i in value if isinstance(value, list) else [value]:
            if i is not None and int(i) not in found:
                found.append(int(i))
    if not found and getattr(tokenizer, "eos_token_id", None) is not None:
        found.append(int(tokenizer.eos_token_id))
    return found


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    attention: str = "auto",
) -> NativeBackend:
    """Load config, safetensors weights and tokenizer from a local directory.

    ``attention`` is ``"auto"`` (Triton kernels on CUDA when triton is installed, else torch),
    ``"torch"`` or ``"triton"`` (see :func:`slmserve.models.attention.resolve_backend`).

    Raises ``FileNotFoundError`` naming the missing file and the directory,
    :class:`UnsupportedModelError` (a ``ValueError`` and a ``PluginError``) naming the supported
    architectures, and ``ValueError`` when weights do not fit the config.
    """
    path = Path(path).expanduser()
    cfg = read_config(path)
    dcfg = DecoderConfig.from_hf(cfg)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    files = weight_files(path)
    decoder = Decoder(dcfg, device=dev, attention=attention)  # a bad switch fails before I/O

    state = load_state(files, dev, dt)
    for key in list(state):
        if key.endswith("rotary_emb.inv_freq") or (
            dcfg.tie_word_embeddings and key == "lm_head.weight"
        ):
            del state[key]
    try:
        decoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {str(path)!r} do not match its config.json: {e}") from None
    decoder.requires_grad_(False).eval()
    if decoder.fused:
        decoder.merge_projections()

    tokenizer = load_tokenizer(path)
    extra = cfg.get("slmserve") or {}
    arch = cfg["architectures"][0]
    info = ModelInfo(
        architecture=arch,
        num_layers=len(dcfg.layers),
        hidden_size=dcfg.hidden_size,
        vocab_size=dcfg.vocab_size,
        kv_layout=dcfg.kv_layout,
        max_position_embeddings=dcfg.max_position_embeddings,
        eos_token_ids=eos_ids(path, cfg, tokenizer),
        dtype=str(dt).removeprefix("torch."),
        device=str(dev),
        description=extra.get("description") or f"{arch} from {path}",
        random_weights=bool(extra.get("random_weights", False)),
    )
    return NativeBackend(decoder, tokenizer, info)


def load_tokenizer(path: Path) -> Any:
    """``AutoTokenizer`` from the checkpoint directory itself (never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load a tokenizer from {str(path)!r}: {e}") from e
