"""``summary``: replace an item by a short summary written by a generation model, cached on disk.

LinkedIn's context compression: postings are summarised once by a generative model and the
scorer reads the summaries, so input length (the cost of scoring) drops by up to 10x. Here the
summariser is a second slmserve :class:`~slmserve.engine.Engine` (greedy, batched), loaded on
the first cache miss and shared by every ``summary`` compressor of the process with the same
model, device and dtype. Summaries live in a SQLite file keyed by a hash of the item text and a
hash of every setting that changes the output (model identity — its files' contents —, dtype,
prompt, chat wrapping, ``max_tokens``, sampling), so a catalog is summarised once, by
``slmserve compress`` offline or on first sight while serving, and survives restarts.

The budget is the serving model's: an item already within ``max_tokens`` tokens of the
*serving* tokenizer is kept as it is, and a summary is cut to fit it whatever the summariser's
tokenizer. A summary that comes out blank falls back to the item's head, so an item is never
erased.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmserve.compressors import check_budget, count_tokens, token_ends
from slmserve.compressors.truncate import Truncate
from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Compressor
from slmserve.plugins import Registry

DEFAULT_PROMPT = (
    "Summarise the text below in one or two short sentences. Keep what a search would match "
    "on: the role, the key skills, the place.\n\n{item}\n\nSummary:"
)
SCHEMA = 1
"""Bump when the key or the stored text changes meaning, so old rows are never reused."""
SUMMARISER_KV_TOKENS = 8192
"""KV pool of the summariser engine: room for a batch of long postings, cheap to allocate."""
DEMO_NAMES = (None, "", "demo")


def default_cache_path() -> Path:
    """``$SLMSERVE_CACHE_DIR/summaries.sqlite`` (default dir ``~/.cache/slmserve``)."""
    base = os.environ.get("SLMSERVE_CACHE_DIR") or Path.home() / ".cache" / "slmserve"
    return Path(base) / "summaries.sqlite"


def item_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class SummaryStats:
    """What one compressor did: items kept (already short), read from the cache, generated."""

    short: int = 0
    hits: int = 0
    generated: int = 0


class Summary(Compressor):
    """Summarise the item with a generation model (cached in SQLite) to at most N tokens."""

    name = "summary"
    runs_model = True

    def __init__(
        self,
        *,
        max_tokens: int = 64,
        model: str | None = None,
        cache: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        chat: bool = True,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        self.max_tokens = check_budget(max_tokens)
        if not isinstance(prompt, str) or "{item}" not in prompt:
            raise ValueError(f"prompt must be a string containing {{item}}, got {prompt!r}")
        if not isinstance(chat, bool):
            raise ValueError(f"chat must be true or false, got {chat!r}")
        for option, value in (("model", model), ("cache", cache), ("device", device)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{option} must be a string, got {value!r}")
        self.model = None if model in DEMO_NAMES else str(Path(str(model)).expanduser().resolve())
        self.prompt = prompt
        self.chat = chat
        self.device, self.dtype = _resolve(device, dtype)
        self.model_id = model_identity(model)
        self.settings = {
            "schema": SCHEMA,
            "model": self.model_id,
            "dtype": self.dtype,
            "prompt": prompt,
            "chat": chat,
            "max_tokens": self.max_tokens,
            "sampling": {"temperature": 0.0},
        }
        self.key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()
        self.store = open_store(Path(cache).expanduser() if cache else default_cache_path())
        self.stats = SummaryStats()
        self._stats_lock = threading.Lock()
        self._trim = Truncate(max_tokens=self.max_tokens)

    def compress(self, item: str, *, query: str, tokenizer: Any) -> str:
        return self.compress_many([item], query=query, tokenizer=tokenizer)[0]

    def compress_many(self, items: Sequence[str], *, query: str, tokenizer: Any) -> list[str]:
        """Cache lookups for all long items at once, then one generation batch for the misses."""
        is_long = [count_tokens(tokenizer, x) > self.max_tokens for x in items]
        long = {item_key(x): x for x, flag in zip(items, is_long) if flag}
        summaries = self.store.get(self.key, long)
        misses = {k: x for k, x in long.items() if k not in summaries}
        generated = 0
        if misses:
            summariser = get_summariser(self.model, self.device, self.dtype)
            with summariser.lock:  # one batch at a time; re-read what another thread just wrote
                summaries.update(self.store.get(self.key, misses))
                todo = {k: x for k, x in misses.items() if k not in summaries}
                if todo:
                    texts = summariser.summarise(
                        list(todo.values()), self.prompt, self.chat, self.max_tokens
                    )
                    fresh = dict(zip(todo, texts))
                    self.store.put(self.key, fresh)
                    summaries.update(fresh)
                    generated = len(fresh)
        with self._stats_lock:
            self.stats.short += is_long.count(False)
            self.stats.generated += generated
            self.stats.hits += len(items) - is_long.count(False) - generated
        return [
            self._fit(x, summaries[item_key(x)], tokenizer) if flag else x
            for x, flag in zip(items, is_long)
        ]

    def _fit(self, item: str, summary: str, tokenizer: Any) -> str:
        """The summary cut to the serving budget (the item's head when the summary is blank)."""
        text = summary if summary.strip() else item
        return self._trim.compress(text, query="", tokenizer=tokenizer)


# ------------------------------------------------------------------------------ settings


def _resolve(device: str, dtype: str) -> tuple[str, str]:
    """Concrete device and dtype names (``auto`` resolved), or ``ValueError`` naming them: the
    dtype is part of the cache key, since bf16 and fp32 greedy decodes can differ."""
    from slmserve.models.loader import resolve_device, resolve_dtype

    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device: {exc}") from None
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a string, got {dtype!r}")
    try:
        dt = resolve_dtype(dtype, dev)
    except ValueError as exc:
        raise ValueError(f"dtype: {exc}") from None
    return str(dev), str(dt).removeprefix("torch.")


def model_identity(model: str | None) -> str:
    """``demo-<version>`` for the demo model (built from a fixed seed); otherwise a digest of
    the checkpoint's ``*.json`` and ``*.safetensors`` files, so retrained weights or a new
    tokenizer never reuse old summaries while a copied checkpoint still does."""
    if model in DEMO_NAMES:
        from slmserve.models.demo import DEMO_VERSION

        return f"demo-{DEMO_VERSION}"
    from slmserve.models.loader import read_config

    path = Path(str(model)).expanduser().resolve()
    try:
        read_config(path)
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")
        )
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        return _digest(stamp)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: {exc}") from None


@lru_cache(maxsize=16)
def _digest(stamp: tuple[tuple[str, int, int], ...]) -> str:
    """Content digest of the files in ``stamp``; memoised on their sizes and mtimes, so a
    server that builds a compressor per request hashes the weights once."""
    h = hashlib.blake2b(digest_size=16)
    for name, _, _ in stamp:
        h.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as fh:
            h.update(hashlib.file_digest(fh, "blake2b").digest())
    return h.hexdigest()


# ------------------------------------------------------------------------------ the SQLite store


class SummaryStore:
    """Summaries on disk: one row per (settings key, item hash).

    One connection shared by all threads behind a lock (lookups are microseconds); WAL mode
    and a busy timeout let a server and ``slmserve compress`` use the same file at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS summaries (settings TEXT NOT NULL, item TEXT NOT NULL,"
                " summary TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (settings, item))"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise ValueError(f"cache: cannot open {str(path)!r} as a SQLite file: {exc}") from None
        self._lock = threading.Lock()

    def get(self, settings: str, items: Iterable[str]) -> dict[str, str]:
        """``{item hash: summary}`` for the hashes found."""
        keys = list(items)
        out: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # stay under SQLite's variable limit
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT item, summary FROM summaries WHERE settings = ? AND item IN ({marks})",
                    [settings, *chunk],
                )
                out.update(rows.fetchall())
        return out

    def put(self, settings: str, summaries: dict[str, str]) -> None:
        now = time.time()
        rows = [(settings, k, v, now) for k, v in summaries.items()]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO summaries VALUES (?, ?, ?, ?)", rows)

    def count(self, settings: str | None = None) -> int:
        with self._lock:
            if settings is None:
                return int(self._db.execute("SELECT COUNT(*) FROM summaries").fetchone()[0])
            query = "SELECT COUNT(*) FROM summaries WHERE settings = ?"
            return int(self._db.execute(query, (settings,)).fetchone()[0])


_STORES: dict[Path, SummaryStore] = {}
_SUMMARISERS: dict[tuple[str, str, str], Summariser] = {}
_STORES_LOCK = threading.Lock()
_SUMMARISERS_LOCK = threading.Lock()


def open_store(path: Path) -> SummaryStore:
    """The process's one store for ``path`` (compressors are built per request)."""
    path = path.resolve()
    with _STORES_LOCK:
        if path not in _STORES:
            _STORES[path] = SummaryStore(path)
        return _STORES[path]


# ------------------------------------------------------------------------------ the summariser


class Summariser:
    """A generation engine over one checkpoint, loaded on first use, one batch at a time."""

    def __init__(self, model: str | None, device: str, dtype: str) -> None:
        from slmserve import Engine, EngineConfig
        from slmserve.plugins import PluginManager

        plugins = PluginManager(load_entrypoints=False)
        backend = plugins.backends.get("native")(model, device=device, dtype=dtype)
        config = EngineConfig(
            model=model or None,
            device=device,
            dtype=dtype,  # type: ignore[arg-type]
            kv_tokens=SUMMARISER_KV_TOKENS,
            gc_freeze=False,
        )
        self.engine = Engine(config, plugins=plugins, backend=backend)
        self.tokenizer = backend.tokenizer
        self.context = min(backend.info.max_position_embeddings, SUMMARISER_KV_TOKENS)
        self.lock = threading.Lock()
        """Held by callers around lookup + generate + store, so a batch runs once."""

    def summarise(self, items: list[str], prompt: str, chat: bool, max_tokens: int) -> list[str]:
        """Greedy summaries of ``items`` in one engine batch (run off any event loop)."""
        from slmserve.types import SamplingParams

        prompts = [self.render(x, prompt, chat, max_tokens) for x in items]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        results = self.engine.generate_batch(prompts, params)
        failed = [r.error for r in results if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"the summary model failed: {failed[0]}")
        return [r.text.strip() for r in results]

    def render(self, item: str, prompt: str, chat: bool, max_tokens: int) -> str:
        """The prompt for ``item`` (in the chat template when asked and the model has one), the
        item cut so prompt + summary fit the summariser's context."""
        limit = self.context - max_tokens
        while True:
            text = prompt.replace("{item}", item)
            if chat and getattr(self.tokenizer, "chat_template", None):
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}],
                    tokenize=False,
                    add_generation_prompt=True,
                    enable_thinking=False,
                )
            over = count_tokens(self.tokenizer, text) - limit
            if over <= 0:
                return text
            ends = token_ends(self.tokenizer, item)
            keep = len(ends) - over
            if keep < 1:
                raise ValueError(
                    f"max_tokens: {max_tokens} summary tokens leave no room for the item in the "
                    f"summary model's context of {self.context} tokens"
                )
            item = item[: ends[keep - 1]]


def get_summariser(model: str | None, device: str, dtype: str) -> Summariser:
    """The process's one summariser for (model, device, dtype), loaded on the first call."""
    key = (str(model or "demo"), device, dtype)
    with _SUMMARISERS_LOCK:  # held while loading: a second caller waits for the same model
        if key not in _SUMMARISERS:
            _SUMMARISERS[key] = Summariser(model, device, dtype)
        return _SUMMARISERS[key]


@hookimpl
def slmserve_register_compressors(registry: Registry) -> None:
    registry.add(
        Summary.name,
        Summary,
        description="summarise with a generation model to N tokens (SQLite cache)",
    )
