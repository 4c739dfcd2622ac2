"""Metrics over a :class:`SimResult`, JSON output and matplotlib plots.

Definitions (the docs and the reproduction tables use exactly these):

* **TTFT**: first token time minus arrival; the first token exists at the *end* of the step
  that produced it. Percentiles over the requests that got a first token (all of them unless
  the run was cut off with ``until``).
* **Throughput**: finished requests (and their prompt + output tokens) per second of simulated
  time, from the first arrival to the end of the last step.
* **Cache hit rate**: prompt tokens found in the radix cache at admission / prompt tokens
  admitted (the engine's ``prefix_hits / prefix_queries``; a preempted request counts again
  when re-admitted).
* **Service** of a client: ``input_price`` × prompt tokens it had *computed* (uncached, chunk
  by chunk) + ``output_price`` × output tokens, per step (prices 1 and 2 as in VTC). The same
  measure for every scheduler, so fairness numbers compare.
* **Backlogged**: a client with at least one request waiting (arrived, not admitted) when a
  step is planned.
* **Max service gap**: over every pair of clients and every stretch of consecutive steps in
  which both stay backlogged, the largest ``|ΔW_f − ΔW_g|`` over a sub-interval (= max − min of
  the running difference of their service within the stretch). VTC bounds this by a constant;
  LPM does not.
* **Jain's index**: ``(Σx)² / (n·Σx²)`` over per-client service received in the steps in which
  *every* client was backlogged (1 = equal shares while all competed); ``None`` without such
  steps, and 1 with a single client.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from slmserve.sim.simulator import SimResult

MAX_SERIES_POINTS = 400
"""Service-over-time curves are downsampled to at most this many points in JSON and plots."""


class Percentiles(msgspec.Struct, kw_only=True):
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None


class ClientSummary(msgspec.Struct, kw_only=True):
    requests: int
    finished: int
    prompt_tokens: int
    computed_prompt_tokens: int
    output_tokens: int
    service: float
    ttft: Percentiles


class Summary(msgspec.Struct, kw_only=True):
    requests: int
    finished: int
    duration: float
    """Simulated seconds from the first arrival to the end of the last step."""
    ttft: Percentiles
    latency: Percentiles
    """Arrival to finish."""
    queue_delay: Percentiles
    """Arrival to first admission."""
    throughput_rps: float
    throughput_tps: float
    """Prompt + output tokens of finished requests per second."""
    cache_hit_rate: float
    preemptions: int
    steps: int
    busy_fraction: float
    """Share of ``duration`` with a step running (the rest: idle, waiting for arrivals)."""
    max_service_gap: float
    jain_index: float | None
    clients: dict[str, ClientSummary]
    sim_wall_s: float


def percentiles(values: Sequence[float] | np.ndarray) -> Percentiles:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return Percentiles(p50=None, p90=None, p99=None, max=None, mean=None)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return Percentiles(
        p50=float(p50), p90=float(p90), p99=float(p99), max=float(a.max()), mean=float(a.mean())
    )


def service_matrix(
    result: SimResult, input_price: float = 1.0, output_price: float = 2.0
) -> np.ndarray:
    """``[steps, clients]`` service received per step."""
    steps = result.steps
    return input_price * steps.prompt + output_price * steps.output


def max_service_gap(service: np.ndarray, backlogged: np.ndarray) -> float:
    """Largest service difference between two clients over an interval where both waited.

    ``service``/``backlogged`` are ``[steps, clients]``. For a pair, ``D`` is the running
    difference of their cumulative service; within a maximal stretch of steps where both are
    backlogged, the worst sub-interval difference is ``max(D) − min(D)`` over the stretch,
    including its start point.
    """
    nclients = service.shape[1] if service.ndim == 2 else 0
    worst = 0.0
    for f in range(nclients):
        for g in range(f + 1, nclients):
            both = backlogged[:, f] & backlogged[:, g]
            if not both.any():
                continue
            d = np.concatenate([[0.0], np.cumsum(service[:, f] - service[:, g])])
            # Stretches [a, b) of steps with both backlogged; D at a is the value before step a.
            edges = np.diff(np.concatenate([[0], both.astype(np.int8), [0]]))
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
                seg = d[a : b + 1]
                worst = max(worst, float(seg.max() - seg.min()))
    return worst


def jain_index(service: np.ndarray, backlogged: np.ndarray) -> float | None:
    if service.shape[1] == 1:
        return 1.0
    everyone = backlogged.all(axis=1)
    if not everyone.any():
        return None
    x = service[everyone].sum(axis=0).astype(np.float64)
    denom = len(x) * float((x * x).sum())
    return float(x.sum() ** 2 / denom) if denom > 0 else None


def summarize(result: SimResult, *, input_price: float = 1.0, output_price: float = 2.0) -> Summary:
    recs = result.records
    steps = result.steps
    first_arrival = min((r.arrival for r in recs), default=0.0)
    duration = max(result.end_time - first_arrival, 0.0)
    done = [r for r in recs if r.finish is not None]
    started = [r for r in recs if r.first_token is not None]
    admitted = [r for r in recs if r.first_scheduled is not None]
    service = service_matrix(result, input_price, output_price)
    clients: dict[str, ClientSummary] = {}
    for ci, name in enumerate(steps.clients):
        mine = [r for r in recs if r.client == name]
        clients[name] = ClientSummary(
            requests=len(mine),
            finished=sum(r.finish is not None for r in mine),
            prompt_tokens=sum(r.prompt_tokens for r in mine),
            computed_prompt_tokens=int(steps.prompt[:, ci].sum()),
            output_tokens=int(steps.output[:, ci].sum()),
            service=float(service[:, ci].sum()),
            ttft=percentiles([r.ttft for r in mine if r.first_token is not None]),
        )
    tokens = sum(r.prompt_tokens + r.output_tokens for r in done)
    busy = float((steps.end - steps.start).sum())
    return Summary(
        requests=len(recs),
        finished=len(done),
        duration=duration,
        ttft=percentiles([r.ttft for r in started]),
        latency=percentiles([r.finish - r.arrival for r in done]),  # type: ignore[operator]
        queue_delay=percentiles([r.first_scheduled - r.arrival for r in admitted]),  # type: ignore[operator]
        throughput_rps=len(done) / duration if duration > 0 else 0.0,
        throughput_tps=tokens / duration if duration > 0 else 0.0,
        cache_hit_rate=result.prefix_hits / result.prefix_queries if result.prefix_queries else 0.0,
        preemptions=result.num_preemptions,
        steps=len(steps),
        busy_fraction=busy / duration if duration > 0 else 0.0,
        max_service_gap=max_service_gap(service, steps.backlogged),
        jain_index=jain_index(service, steps.backlogged),
        clients=clients,
        sim_wall_s=result.wall_time,
    )


def service_over_time(
    result: SimResult,
    *,
    input_price: float = 1.0,
    output_price: float = 2.0,
    points: int = MAX_SERIES_POINTS,
) -> dict[str, Any]:
    """Cumulative service per client at (up to ``points``) step ends: ``{"t": [...], "service":
    {client: [...]}}``."""
    steps = result.steps
    if len(steps) == 0:
        return {"t": [], "service": {c: [] for c in steps.clients}}
    cum = np.cumsum(service_matrix(result, input_price, output_price), axis=0)
    idx = np.unique(np.linspace(0, len(steps) - 1, min(points, len(steps))).astype(int))
    return {
        "t": steps.end[idx].tolist(),
        "service": {c: cum[idx, ci].tolist() for ci, c in enumerate(steps.clients)},
    }


# ---------------------------------------------------------------------------- output


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` (dicts, lists, msgspec Structs, numpy scalars) as indented JSON."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f"cannot encode {type(obj).__name__}")

    raw = msgspec.json.encode(data, enc_hook=default)
    Path(path).write_bytes(msgspec.json.format(raw, indent=1))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "plots need matplotlib: pip install 'slmserve[sim]' (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_load(
    rows: Sequence[tuple[str, float, float | None]],
    path: str | Path,
    *,
    ylabel: str = "P99 TTFT (s)",
    title: str = "",
    logy: bool = True,
) -> None:
    """One line per scheduler: ``rows`` are ``(scheduler, load, value)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in dict.fromkeys(r[0] for r in rows):
        pts = sorted((load, v) for s, load, v in rows if s == name and v is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("offered load (× capacity)")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_service(
    series: Sequence[tuple[str, dict[str, Any]]],
    path: str | Path,
    *,
    title: str = "",
) -> None:
    """Cumulative service per client over time, one panel per ``(label, service_over_time)``."""
    plt = _pyplot()
    n = max(len(series), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for ax, (label, data) in zip(axes.flat, series):
        for client, values in data["service"].items():
            ax.plot(data["t"], values, label=client)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("service (tokens, in×1 + out×2)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(series) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
