"""``slmserve plan`` output: a text table, ``plan.json`` and a demand-vs-capacity PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from slmserve.plan.planner import PeriodPlan


def format_table(plans: Sequence[PeriodPlan], names: Sequence[str]) -> str:
    """One row per period: demand, counts per type, $/h, capacity, utilisation, P99."""
    width = max(6, *(len(n) for n in names))
    head = (
        f"{'period':<10} {'demand':>9} "
        + " ".join(f"{n:>{width}}" for n in names)
        + f" {'cost/h':>9} {'change':>7} {'capacity':>9} {'util':>5} {'P99 s':>7} {'ok':>3}"
    )
    lines = [head, "-" * len(head)]
    for p in plans:
        p99 = "-" if p.p99 is None else f"{p.p99:.3f}"
        lines.append(
            f"{p.period[:10]:<10} {p.demand:>9.4g} "
            + " ".join(f"{p.counts[n]:>{width}}" for n in names)
            + f" {p.cost_per_hour:>9.2f} {p.change_cost:>7.2f} {p.capacity:>9.4g}"
            + f" {min(p.utilisation, 9.99):>5.2f} {p99:>7} {'yes' if p.feasible else 'NO':>3}"
        )
    notes = [f"{p.period}: {p.note}" for p in plans if p.note]
    return "\n".join(lines + notes)


def plot_plan(plans: Sequence[PeriodPlan], names: Sequence[str], capacity: Sequence[float],
              path: str | Path) -> None:  # fmt: skip
    """Demand and planned capacity (stacked by type) per period."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "the demand-vs-capacity plot needs matplotlib: pip install 'slmserve[sim]' "
            "(or pass --no-plot)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(plans)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(plans) + 3), 4))
    bottom = [0.0] * len(plans)
    for name, mu in zip(names, capacity):
        heights = [p.counts[name] * mu for p in plans]
        if any(heights):
            ax.bar(x, heights, bottom=bottom, width=0.8, label=f"{name} capacity", alpha=0.7)
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.step(x, [p.demand for p in plans], where="mid", color="black", lw=2, label="demand")
    ax.set_xticks(x, [p.period for p in plans], rotation=45 if len(plans) > 8 else 0)
    ax.set_ylabel("items/s")
    ax.margins(y=0.08)
    ax.set_title("demand vs planned capacity")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
