"""Workload generators for the simulator, and JSONL trace replay.

Only token *equality* matters to the engine (the radix cache compares ids), so prompts are random
ids from ``[1, 2**31)``: two independently drawn sequences share no prefix (a clash of first
tokens has probability 2**-31), and a shared prefix is literally the same leading array. Every
generator takes a ``seed`` and is deterministic given it.

Arrival times are in seconds at the workload's *nominal* rate. Sweeping load does not regenerate
the workload: :meth:`Workload.scaled` stretches or compresses the arrival times, so every load
level sees the same requests in the same order (see ``slmserve/sim/cli.py``).

Generators (``WORKLOADS``):

* ``klpm`` — the k-LPM paper's data model (Dexter et al.): ``G`` groups, each request a group's
  shared prefix ``P`` plus a unique suffix ``S``; regular arrivals; the group sequence is a
  shuffle of equally many requests per group (a height-two prefix tree).
* ``gsp`` — SGLang ``bench_serving --dataset-name generated-shared-prefix``: groups of prompts
  sharing a system prompt, each with its own question, shuffled; Poisson arrivals.
* ``vtc-overload``, ``vtc-overload-multi``, ``vtc-proportional``, ``vtc-on-off-less``,
  ``vtc-on-off-overload``, ``vtc-poisson-short-long-2`` — the VTC artifact's synthetic suites
  (``fair_bench/exp_suite.py`` and ``trace.py``), rates and lengths verbatim. The artifact's
  prompts are ``"Hello " * n`` (S-LoRA has no prefix cache); ours are unique, so a radix cache
  does not turn them into free hits.
* ``locality-mix`` — the DLPM setting: client ``docs`` asks short questions about a few long
  documents (high prefix reuse), client ``unique`` sends unique prompts; both Poisson.
* ``zipf-clients`` — the multi-replica setting: clients with Zipf-skewed rates, each with its
  own Zipf-popular prefixes (:mod:`slmserve.sim.cluster`).
* ``trace`` — replay a JSONL file (:class:`TraceEntry` per line).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from slmserve.sim.simulator import SimRequest
from slmserve.types import DEFAULT_CLIENT

TOKEN_HIGH = 2**31
"""Token ids are drawn from ``[1, TOKEN_HIGH)``; 0 is the simulator's output token."""

_NO_TOKENS = np.empty(0, np.int64)

LenSpec = int | Sequence[int]
"""A fixed length, or ``[lo, hi]`` for a uniform draw in the closed range."""


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    requests: list[SimRequest]
    params: dict[str, Any]
    kv_tokens: int | None = None
    """Suggested KV pool (tokens) for the scenario to mean something: prefix reuse only depends
    on the order when the cache is smaller than the working set. ``None``: no opinion."""

    @property
    def offered_rate(self) -> float:
        """Mean arrival rate in requests/s: ``(n - 1) / (last arrival - first arrival)``.

        ``n - 1`` intervals span the arrivals, so regular arrivals every ``Δ`` give ``1/Δ``.
        """
        times = [r.arrival for r in self.requests]
        span = max(times) - min(times) if times else 0.0
        if len(times) < 2 or span <= 0:
            return math.inf
        return (len(times) - 1) / span

    def scaled(self, rate: float) -> Workload:
        """The same requests with arrival times stretched so the mean rate is ``rate`` req/s."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        current = self.offered_rate
        if math.isinf(current):
            raise ValueError(f"workload {self.name!r} arrives all at once: no rate to scale")
        t0 = min(r.arrival for r in self.requests)
        factor = current / rate
        reqs = [replace(r, arrival=(r.arrival - t0) * factor) for r in self.requests]
        return replace(self, requests=reqs)

    def at_once(self) -> Workload:
        """Every request arrives at t=0 (in the original order): the saturated case."""
        return replace(self, requests=[replace(r, arrival=0.0) for r in self.requests])


# ---------------------------------------------------------------------------- helpers


def _tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1, TOKEN_HIGH, size=n, dtype=np.int64)


def _lengths(rng: np.random.Generator, spec: LenSpec, n: int, name: str) -> np.ndarray:
    """``n`` lengths from ``spec`` (fixed, or uniform over the closed ``[lo, hi]``)."""
    if isinstance(spec, int | np.integer):
        lo = hi = int(spec)
    else:
        if len(spec) != 2:
            raise ValueError(f"{name} must be an int or [lo, hi], got {spec!r}")
        lo, hi = int(spec[0]), int(spec[1])
    if lo < 0 or hi < lo:
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi, got {spec!r}")
    return rng.integers(lo, hi + 1, size=n)


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _poisson_times(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


# ---------------------------------------------------------------------------- generators


def klpm_paper(
    *,
    seed: int = 0,
    num_requests: int = 2000,
    groups: int = 16,
    prefix_len: int = 2000,
    suffix_len: LenSpec = (200, 500),
    output_len: LenSpec = (1, 10),
    rate: float = 20.0,
    kv_tokens: int = 24_576,
) -> Workload:
    """The k-LPM paper's generative model: a regular arrival, shuffled queue.

    Request ``j`` arrives at ``j / rate``. Its group comes from a random permutation of
    ``num_requests`` slots dealt to the ``groups`` round-robin (equal counts up to one), its
    prompt is that group's ``prefix_len``-token prefix plus a unique suffix, and outputs are
    short (prefill-dominated, as the paper's model assumes). The suggested KV pool holds only a
    few of the ``groups * prefix_len`` prefix tokens, so reuse depends on the order.
    """
    rng = np.random.default_rng(seed)
    rate = _positive("rate", rate)
    prefixes = [_tokens(rng, prefix_len) for _ in range(groups)]
    order = rng.permutation(np.arange(num_requests) % groups)
    suffixes = _lengths(rng, suffix_len, num_requests, "suffix_len")
    outputs = _lengths(rng, output_len, num_requests, "output_len")
    reqs = [
        SimRequest(
            rid=f"r{j}",
            arrival=j / rate,
            prompt=np.concatenate([prefixes[g], _tokens(rng, int(suffixes[j]))]),
            output_len=max(1, int(outputs[j])),
            group=f"g{g}",
        )
        for j, g in enumerate(order.tolist())
    ]
    params = {
        "num_requests": num_requests,
        "groups": groups,
        "prefix_len": prefix_len,
        "suffix_len": suffix_len,
        "output_len": output_len,
        "rate": rate,
    }
    return Workload("klpm", reqs, params, kv_tokens)


def generated_shared_prefix(
    *,
    seed: int = 0,
    num_groups: int = 64,
    prompts_per_group: int = 16,
    system_prompt_len: int = 2048,
    question_len: int = 128,
    output_len: int = 256,
    range_ratio: float = 1.0,
    rate: float = 16.0,
    kv_tokens: int = 65_536,
) -> Workload:
    """SGLang's ``generated-shared-prefix`` dataset (``--gsp-*`` defaults), shuffled.

    Lengths are drawn uniformly from ``[range_ratio * len, len]`` per group (system prompt) and
    per request (question, output), as SGLang's ``compute_random_lens``; ``range_ratio=1`` gives
    fixed lengths. Arrivals are Poisson at ``rate`` (``bench_serving --request-rate``).
    """
    rng = np.random.default_rng(seed)
    rate = _positive("rate", rate)
    if not 0 < range_ratio <= 1:
        raise ValueError(f"range_ratio must be in (0, 1], got {range_ratio}")

    def lens(full: int, n: int) -> np.ndarray:
        return rng.integers(max(1, int(full * range_ratio)), full + 1, size=n)

    n = num_groups * prompts_per_group
    systems = [_tokens(rng, int(k)) for k in lens(system_prompt_len, num_groups)]
    questions = lens(question_len, n)
    outputs = lens(output_len, n)
    slots = [(g, q) for g in range(num_groups) for q in range(prompts_per_group)]
    order = rng.permutation(n)
    times = _poisson_times(rng, rate, n)
    reqs = []
    for j, idx in enumerate(order.tolist()):
        g, _ = slots[idx]
        reqs.append(
            SimRequest(
                rid=f"r{j}",
                arrival=float(times[j]),
                prompt=np.concatenate([systems[g], _tokens(rng, int(questions[idx]))]),
                output_len=max(1, int(outputs[idx])),
                group=f"g{g}",
            )
        )
    params = {
        "num_groups": num_groups,
        "prompts_per_group": prompts_per_group,
        "system_prompt_len": system_prompt_len,
        "question_len": question_len,
        "output_len": output_len,
        "range_ratio": range_ratio,
        "rate": rate,
    }
    return Workload("gsp", reqs, params, kv_tokens)


def vtc_uniform(
    *,
    seed: int = 0,
    rates: Sequence[float] = (1.5, 3.0),
    duration: float = 360.0,
    input_len: LenSpec = 256,
    output_len: LenSpec = 256,
    on_off: float | None = None,
    name: str = "vtc-uniform",
) -> Workload:
    """The VTC artifact's ``uniform`` mode: client ``i`` sends every ``1/rates[i]`` seconds.

    ``rates[i] * duration`` requests per client, the first at a random phase in
    ``[1/rate, 2/rate)``; with ``on_off`` set, client 0 sends nothing during odd ``on_off``-second
    periods (its requests there are dropped), as in ``generate_requests_uniform``.
    """
    rng = np.random.default_rng(seed)
    reqs: list[SimRequest] = []
    for i, rate in enumerate(rates):
        rate = _positive(f"rates[{i}]", rate)
        count = int(rate * duration)
        ins = _lengths(rng, input_len, count, "input_len")
        outs = _lengths(rng, output_len, count, "output_len")
        t = rng.random() / rate
        for j in range(count):
            t += 1.0 / rate
            if on_off is not None and i == 0 and int(t // on_off) % 2 == 1:
                continue
            reqs.append(
                SimRequest(
                    rid=f"c{i}-{j}",
                    arrival=t,
                    prompt=_tokens(rng, max(1, int(ins[j]))),
                    output_len=max(1, int(outs[j])),
                    client=f"client{i}",
                )
            )
    params = {
        "rates": list(rates),
        "duration": duration,
        "input_len": input_len,
        "output_len": output_len,
        "on_off": on_off,
    }
    return Workload(name, sorted(reqs, key=lambda r: (r.arrival, r.rid)), params)


def vtc_poisson_short_long_2(
    *,
    seed: int = 0,
    rates: Sequence[float] = (8.0, 1.5),
    duration: float = 600.0,
    input_len: LenSpec = 32,
    output_len: LenSpec = 512,
) -> Workload:
    """VTC's ``poisson_short_long_2``: one Poisson stream split between two clients.

    Client 0 (the frequent one) has input and output lengths swapped (512 in / 32 out), client 1
    keeps them (32 in / 512 out), as in the artifact.
    """
    rng = np.random.default_rng(seed)
    total = sum(_positive("rates", r) for r in rates)
    n = int(total * duration)
    which = (rng.random(n) > rates[0] / total).astype(int)
    ins = _lengths(rng, input_len, n, "input_len")
    outs = _lengths(rng, output_len, n, "output_len")
    times = _poisson_times(rng, total, n)
    reqs = []
    for j in range(n):
        c = int(which[j])
        i_len, o_len = (int(outs[j]), int(ins[j])) if c == 0 else (int(ins[j]), int(outs[j]))
        reqs.append(
            SimRequest(
                rid=f"r{j}",
                arrival=float(times[j]),
                prompt=_tokens(rng, max(1, i_len)),
                output_len=max(1, o_len),
                client=f"client{c}",
            )
        )
    params = {
        "rates": list(rates),
        "duration": duration,
        "input_len": input_len,
        "output_len": output_len,
    }
    return Workload("vtc-poisson-short-long-2", reqs, params)


def _vtc_suite(name: str, rates: Sequence[float], duration: float, on_off: float | None = None):
    def make(*, seed: int = 0, **options: Any) -> Workload:
        kwargs: dict[str, Any] = {"rates": rates, "duration": duration, "on_off": on_off}
        kwargs.update(options)
        return vtc_uniform(seed=seed, name=name, **kwargs)

    make.__doc__ = (
        f"VTC artifact suite ``{name.removeprefix('vtc-').replace('-', '_')}``: "
        f"rates {list(rates)} req/s, {duration:g} s, 256 in / 256 out"
        + (f", client 0 on/off every {on_off:g} s" if on_off else "")
        + "."
    )
    return make


def locality_mix(
    *,
    seed: int = 0,
    num_requests: int = 2000,
    docs: int = 16,
    doc_len: int = 4096,
    question_len: LenSpec = (32, 96),
    docs_output: LenSpec = (16, 48),
    unique_len: LenSpec = (768, 1280),
    unique_output: LenSpec = (16, 48),
    rate: float = 20.0,
    docs_share: float = 0.5,
    kv_tokens: int = 32_768,
) -> Workload:
    """Two clients, one with locality and one without (the DLPM paper's motivating case).

    Client ``docs``: a question about one of ``docs`` long documents (chosen uniformly), i.e.
    ``doc_len`` shared tokens plus a short unique question. Client ``unique``: prompts that
    share nothing. ``num_requests`` Poisson arrivals at ``rate`` in total, a ``docs_share``
    fraction from ``docs``. The suggested KV pool holds about four documents, so FIFO-like
    orders thrash while prefix-aware ones keep a document hot.
    """
    rng = np.random.default_rng(seed)
    rate = _positive("rate", rate)
    documents = [_tokens(rng, doc_len) for _ in range(docs)]
    is_docs = rng.random(num_requests) < docs_share
    which = rng.integers(0, docs, size=num_requests)
    q_lens = _lengths(rng, question_len, num_requests, "question_len")
    d_outs = _lengths(rng, docs_output, num_requests, "docs_output")
    u_lens = _lengths(rng, unique_len, num_requests, "unique_len")
    u_outs = _lengths(rng, unique_output, num_requests, "unique_output")
    times = _poisson_times(rng, rate, num_requests)
    reqs = []
    for j in range(num_requests):
        if is_docs[j]:
            d = int(which[j])
            prompt = np.concatenate([documents[d], _tokens(rng, max(1, int(q_lens[j])))])
            req = SimRequest(
                rid=f"r{j}",
                arrival=float(times[j]),
                prompt=prompt,
                output_len=max(1, int(d_outs[j])),
                client="docs",
                group=f"doc{d}",
            )
        else:
            req = SimRequest(
                rid=f"r{j}",
                arrival=float(times[j]),
                prompt=_tokens(rng, max(1, int(u_lens[j]))),
                output_len=max(1, int(u_outs[j])),
                client="unique",
            )
        reqs.append(req)
    params = {
        "num_requests": num_requests,
        "docs": docs,
        "doc_len": doc_len,
        "question_len": question_len,
        "docs_output": docs_output,
        "unique_len": unique_len,
        "unique_output": unique_output,
        "rate": rate,
        "docs_share": docs_share,
    }
    return Workload("locality-mix", reqs, params, kv_tokens)


def _zipf(n: int, skew: float) -> np.ndarray:
    """Probabilities of ranks ``1..n`` under Zipf's law with exponent ``skew`` (0: uniform)."""
    if n < 1:
        raise ValueError(f"need at least one rank, got {n}")
    if skew < 0 or math.isnan(skew):
        raise ValueError(f"a Zipf exponent must be >= 0, got {skew}")
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew
    return w / w.sum()


def zipf_clients(
    *,
    seed: int = 0,
    num_requests: int = 4000,
    clients: int = 8,
    client_skew: float = 1.2,
    prefixes_per_client: int = 4,
    prefix_skew: float = 1.0,
    prefix_len: LenSpec = (1024, 2048),
    suffix_len: LenSpec = (32, 256),
    output_len: LenSpec = (16, 64),
    rate: float = 40.0,
    kv_tokens: int = 32_768,
) -> Workload:
    """Skewed clients with Zipf-popular prefixes: the multi-replica routing scenario.

    Client ``c`` (``client0`` the heaviest) sends a share of the ``num_requests`` Poisson
    arrivals proportional to ``1 / (c + 1) ** client_skew``. Each client has its own
    ``prefixes_per_client`` prefixes (documents, system prompts) of ``prefix_len`` tokens, picked
    with Zipf(``prefix_skew``) popularity, followed by a unique suffix. So a few prefixes carry
    much of the traffic, mostly from one client: routing every request to the replica that
    caches its prefix overloads that replica, spreading blindly loses the reuse.
    """
    rng = np.random.default_rng(seed)
    rate = _positive("rate", rate)
    client_p = _zipf(clients, float(client_skew))
    prefix_p = _zipf(prefixes_per_client, float(prefix_skew))
    plens = _lengths(rng, prefix_len, clients * prefixes_per_client, "prefix_len")
    prefixes = [_tokens(rng, max(1, int(n))) for n in plens]
    who = rng.choice(clients, size=num_requests, p=client_p)
    which = rng.choice(prefixes_per_client, size=num_requests, p=prefix_p)
    suffixes = _lengths(rng, suffix_len, num_requests, "suffix_len")
    outputs = _lengths(rng, output_len, num_requests, "output_len")
    times = _poisson_times(rng, rate, num_requests)
    reqs = []
    for j in range(num_requests):
        c, k = int(who[j]), int(which[j])
        reqs.append(
            SimRequest(
                rid=f"r{j}",
                arrival=float(times[j]),
                prompt=np.concatenate(
                    [prefixes[c * prefixes_per_client + k], _tokens(rng, int(suffixes[j]))]
                ),
                output_len=max(1, int(outputs[j])),
                client=f"client{c}",
                group=f"c{c}-p{k}",
            )
        )
    params = {
        "num_requests": num_requests,
        "clients": clients,
        "client_skew": client_skew,
        "prefixes_per_client": prefixes_per_client,
        "prefix_skew": prefix_skew,
        "prefix_len": prefix_len,
        "suffix_len": suffix_len,
        "output_len": output_len,
        "rate": rate,
    }
    return Workload("zipf-clients", reqs, params, kv_tokens)


# ---------------------------------------------------------------------------- traces


class TraceEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One line of a JSONL trace.

    Give either ``prompt_tokens`` (explicit ids), or ``prompt_len`` with an optional
    ``prefix_group``/``prefix_len``: the first ``prefix_len`` tokens are then the group's shared
    prefix (the same ids for every entry of the group, whatever its ``prefix_len``: shorter ones
    are prefixes of longer ones) and the rest are unique.
    """

    arrival: float
    """Seconds from the start of the trace."""
    output_len: int
    client: str = DEFAULT_CLIENT
    prompt_tokens: list[int] | None = None
    prompt_len: int | None = None
    prefix_group: str | None = None
    prefix_len: int = 0
    rid: str | None = None


def read_trace(path: str | Path, *, seed: int = 0, kv_tokens: int | None = None) -> Workload:
    """Replay a JSONL trace (see :class:`TraceEntry`); errors name the line."""
    path = Path(path)
    decoder = msgspec.json.Decoder(TraceEntry)
    entries: list[TraceEntry] = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = decoder.decode(line)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            _check_entry(entry, f"{path}:{lineno}")
            entries.append(entry)
    return trace_workload(entries, seed=seed, name=f"trace:{path.name}", kv_tokens=kv_tokens)


def _check_entry(e: TraceEntry, where: str) -> None:
    if (e.prompt_tokens is None) == (e.prompt_len is None):
        raise ValueError(f"{where}: give exactly one of prompt_tokens and prompt_len")
    if e.prompt_tokens is not None and not e.prompt_tokens:
        raise ValueError(f"{where}: prompt_tokens is empty")
    if e.prompt_len is not None and e.prompt_len < 1:
        raise ValueError(f"{where}: prompt_len must be >= 1")
    if e.prompt_len is not None and not 0 <= e.prefix_len <= e.prompt_len:
        raise ValueError(f"{where}: prefix_len must be in [0, prompt_len]")
    if e.prefix_len and e.prefix_group is None:
        raise ValueError(f"{where}: prefix_len needs a prefix_group")
    if e.output_len < 1:
        raise ValueError(f"{where}: output_len must be >= 1")
    if not math.isfinite(e.arrival) or e.arrival < 0:
        raise ValueError(f"{where}: arrival must be finite and >= 0")


def trace_workload(
    entries: Iterable[TraceEntry],
    *,
    seed: int = 0,
    name: str = "trace",
    kv_tokens: int | None = None,
) -> Workload:
    """Build requests from trace entries; group prefixes are seeded by ``(seed, group name)``."""
    entries = list(entries)
    longest: dict[str, int] = {}
    for e in entries:
        if e.prefix_group is not None and e.prompt_tokens is None:
            longest[e.prefix_group] = max(longest.get(e.prefix_group, 0), e.prefix_len)
    prefixes = {
        g: _tokens(np.random.default_rng([seed, zlib.crc32(g.encode())]), n)
        for g, n in longest.items()
    }
    rng = np.random.default_rng([seed, 0x7ACE])
    reqs = []
    for j, e in enumerate(entries):
        if e.prompt_tokens is not None:
            prompt = np.asarray(e.prompt_tokens, np.int64)
        else:
            assert e.prompt_len is not None
            shared = prefixes[e.prefix_group][: e.prefix_len] if e.prefix_len else _NO_TOKENS
            prompt = np.concatenate([shared, _tokens(rng, e.prompt_len - e.prefix_len)])
        reqs.append(
            SimRequest(
                rid=e.rid or f"r{j}",
                arrival=e.arrival,
                prompt=prompt,
                output_len=e.output_len,
                client=e.client,
                group=e.prefix_group,
            )
        )
    return Workload(name, sorted(reqs, key=lambda r: (r.arrival, r.rid)), {}, kv_tokens)


def write_trace(workload: Workload, path: str | Path) -> None:
    """Write a workload as a JSONL trace with explicit ``prompt_tokens`` (exact replay)."""
    encoder = msgspec.json.Encoder()
    with Path(path).open("wb") as f:
        for r in workload.requests:
            entry = TraceEntry(
                arrival=r.arrival,
                output_len=r.output_len,
                client=r.client,
                prompt_tokens=r.prompt.tolist(),
                prefix_group=r.group,
                rid=r.rid,
            )
            f.write(encoder.encode(entry) + b"\n")


# ---------------------------------------------------------------------------- registry


def _trace(*, seed: int = 0, path: str | None = None, kv_tokens: int | None = None) -> Workload:
    """Replay a JSONL trace file (``path=FILE``)."""
    if path is None:
        raise ValueError("workload 'trace' needs path=FILE.jsonl")
    return read_trace(path, seed=seed, kv_tokens=kv_tokens)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "klpm": klpm_paper,
    "gsp": generated_shared_prefix,
    "vtc-overload": _vtc_suite("vtc-overload", (1.5, 3.0), 360.0),
    "vtc-overload-multi": _vtc_suite(
        "vtc-overload-multi", (0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6), 360.0
    ),
    "vtc-proportional": _vtc_suite("vtc-proportional", (0.25, 0.5, 1.5), 600.0),
    "vtc-on-off-less": _vtc_suite("vtc-on-off-less", (0.5, 2.0), 600.0, on_off=60.0),
    "vtc-on-off-overload": _vtc_suite("vtc-on-off-overload", (2.0, 3.0), 600.0, on_off=60.0),
    "vtc-poisson-short-long-2": vtc_poisson_short_long_2,
    "locality-mix": locality_mix,
    "zipf-clients": zipf_clients,
    "trace": _trace,
}
"""Name -> generator ``(seed=..., **options) -> Workload``."""


def make_workload(name: str, *, seed: int = 0, **options: Any) -> Workload:
    """Build a named workload; unknown names and options raise ``ValueError`` naming them."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}") from None
    try:
        return factory(seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"workload {name!r}: {exc}") from None
