"""The performance goals of the hot path, each a ratio a benchmark measures against a
baseline in the same run, and how the suite reads them from each benchmark's JSON
report. Pure: no Redis, no processes."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

#: Where a goal's figure is missing: the reason is given in its row.
NOT_MEASURED = "not measured"


@dataclass(frozen=True, slots=True)
class Goal:
    """A ratio, where a scenario's report holds it (a median/min/max spread), and the
    bound it should keep (None: the suite shows the ratio, no bound is set here)."""

    key: str
    scenario: str
    text: str
    path: tuple[str, ...]
    op: str  # ">=" or "<="
    target: float | None
    unit: str = "x"  # "x": a ratio; "B": bytes; "calls": a count of calls
    why: tuple[str, ...] = ()  # where the report says why the figure may be missing


GOALS: tuple[Goal, ...] = (
    Goal(
        "throughput.rpush",
        "throughput",
        "batched publish -> applied, 1 appender, vs pipelined RPUSH",
        ("summary", "batched", "ratio", "throughput"),
        ">=",
        0.5,
    ),
    Goal(
        "throughput.langchain",
        "throughput",
        "batched publish -> applied vs LangChain RedisChatMessageHistory",
        ("ratios", "batched_vs_peer"),
        ">=",
        3.0,
        why=("peers", "langchain"),
    ),
    Goal(
        "throughput.workers",
        "throughput",
        "2 appender workers vs 1, batched throughput",
        ("ratios", "scaled_vs_batched"),
        ">=",
        1.6,
    ),
    Goal(
        "latency.p50",
        "latency",
        "1 msg per call at 1,000 msg/s: publish -> applied p50 vs RPUSH round trip",
        ("summary", "single", "ratio", "p50"),
        "<=",
        3.0,
    ),
    Goal(
        "latency.p99",
        "latency",
        "1 msg per call at 1,000 msg/s: publish -> applied p99 vs RPUSH round trip",
        ("summary", "single", "ratio", "p99"),
        "<=",
        5.0,
    ),
    Goal(
        "latency.wait",
        "latency",
        "publish(wait=True) at 1,000 msg/s: p50 vs RPUSH round trip",
        ("summary", "wait", "ratio", "p50"),
        "<=",
        4.0,
    ),
    Goal(
        "space.message",
        "space",
        "settled bytes per message: (B - 100) / its JSON",
        ("summary", "ratio_over_json"),
        "<=",
        1.5,
    ),
    Goal(
        "space.memory",
        "space",
        "a 1-message memory: bytes beyond its message",
        ("summary", "single_beyond_message_bytes"),
        "<=",
        1024,
        unit="B",
    ),
    Goal(
        "producer.cpu",
        "producer",
        "producer CPU per message: publish_many vs pipelined XADD",
        ("summary", "ratio", "cpu_per_msg"),
        "<=",
        2.0,
    ),
    Goal(
        "counting.tiktoken",
        "counting",
        "accountant msg/s vs raw tiktoken",
        ("summary", "ratios", "msg_per_s_vs_raw_tiktoken"),
        ">=",
        0.8,
    ),
    Goal(
        "reads.small",
        "reads",
        "read_context p50 vs LRANGE, smaller memory",
        ("summary", "ratios", "small"),
        "<=",
        1.5,
    ),
    Goal(
        "reads.growth",
        "reads",
        "read_context p50, 10,000-message memory vs 500-message memory",
        ("summary", "ratios", "growth"),
        "<=",
        1.2,
    ),
    Goal(
        "reads.large",
        "reads",
        "read_context p50 vs LRANGE, larger memory",
        ("summary", "ratios", "large"),
        "<=",
        None,
    ),
    Goal(
        "waiters.single",
        "waiters",
        "publish(wait=True) p50 vs RPUSH round trip (waiters script)",
        ("summary", "single", "p50_ratio_to_rpush"),
        "<=",
        4.0,
    ),
    Goal(
        "waiters.concurrent",
        "waiters",
        "1,000 concurrent publish(wait=True) in one process: completed (errors and "
        "breaker openings in the run file)",
        ("summary", "concurrent", "completed"),
        ">=",
        1000,
        unit="calls",
    ),
)


def dig(report: Any, path: Sequence[str]) -> Any:
    for step in path:
        if not isinstance(report, dict) or step not in report:
            return None
        report = report[step]
    return report


def is_spread(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(value.get(k), int | float) for k in ("median", "min", "max")
    )


def met(op: str, target: float | None, median: float) -> bool | None:
    if target is None:
        return None
    return median >= target if op == ">=" else median <= target


def row(goal: Goal, value: Any, note: str = "") -> dict[str, Any]:
    """One line of the table: the goal, its measured spread (or why there is none), and
    whether the median keeps the bound."""
    out: dict[str, Any] = {
        "key": goal.key,
        "scenario": goal.scenario,
        "goal": goal.text,
        "op": goal.op,
        "target": goal.target,
        "unit": goal.unit,
    }
    if is_spread(value):
        out["ratio"] = {k: float(value[k]) for k in ("median", "min", "max")}
        out["met"] = met(goal.op, goal.target, out["ratio"]["median"])
    else:
        out["ratio"] = None
        out["met"] = None
        out["note"] = note or f"{NOT_MEASURED}: no {'.'.join(goal.path)} in the report"
    return out


def declared(report: dict[str, Any], scenario: str) -> list[dict[str, Any]] | None:
    """The goals a report declares itself (``"goals": [{"key", "goal", "op", "target",
    "ratio": {"median", "min", "max"}, "unit"}]``), as rows; None when it declares none."""
    goals = report.get("goals")
    if not isinstance(goals, list) or not goals:
        return None
    rows: list[dict[str, Any]] = []
    for g in goals:
        if not isinstance(g, dict):
            continue
        target = g.get("target")
        goal = Goal(
            key=str(g.get("key", f"{scenario}.{len(rows) + 1}")),
            scenario=scenario,
            text=str(g.get("goal", g.get("key", "?"))),
            path=("goals",),
            op=">=" if g.get("op") == ">=" else "<=",
            target=float(target) if isinstance(target, int | float) else None,
            unit=str(g.get("unit", "x")),
        )
        rows.append(row(goal, g.get("ratio"), "not measured: the report gave no ratio"))
    return rows


def reason(report: dict[str, Any], goal: Goal) -> str:
    """What the report says about why the goal's figure may be missing ("": nothing)."""
    why = dig(report, goal.why) if goal.why else None
    return why if isinstance(why, str) else ""


def rows_for(
    scenario: str, report: dict[str, Any] | None, missing: str = ""
) -> list[dict[str, Any]]:
    """The table's rows of one scenario: what its report declares, else the suite's own
    goals read from it; without a report, every goal of the scenario with the reason."""
    if report is not None and (own := declared(report, scenario)) is not None:
        return own
    goals = [g for g in GOALS if g.scenario == scenario]
    if report is None:
        return [row(g, None, missing) for g in goals]
    doubts = caveats(scenario, report)
    rows = [row(g, dig(report, g.path), reason(report, g)) for g in goals]
    return [{**r, "caveats": doubts} if doubts and r["ratio"] else r for r in rows]


#: An open-loop sender that started its calls later than this behind schedule (p99, ms)
#: did not offer the load it was asked to.
LATE_MS = 10.0


def caveats(scenario: str, report: dict[str, Any] | None) -> list[str]:
    """What makes a scenario's figures doubtful, read from its report."""
    if report is None or scenario != "latency":
        return []
    late = {
        f"{label} {system}": e["late_p99_ms"]["median"]
        for label, pair in (report.get("summary") or {}).items()
        for system, e in pair.items()
        if isinstance(e, dict) and is_spread(e.get("late_p99_ms"))
    }
    behind = {k: v for k, v in late.items() if v > LATE_MS}
    if not behind:
        return []
    worst = ", ".join(f"{k} {v:,.0f} ms" for k, v in behind.items())
    return [
        f"calls started behind the open-loop schedule (p99 of how late: {worst}): a "
        f"memory's previous call had not returned yet, or the producers' process could not "
        f"keep up; latencies run from each call's start and leave that delay out"
    ]


def numbers(tree: Any, name: str = "background_cores") -> Iterator[float]:
    """Every number under a key called ``name``, anywhere in a report."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == name:
                yield from flat(value)
            else:
                yield from numbers(value, name)
    elif isinstance(tree, list):
        for value in tree:
            yield from numbers(value, name)


def flat(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, list):
        for v in value:
            yield from flat(v)


def background(report: Any) -> dict[str, Any] | None:
    """The CPUs other processes kept busy during a report's timed windows (the harness
    measures it per window): every value, the median and the highest."""
    values = list(numbers(report.get("runs", report) if isinstance(report, dict) else report))
    if not values:
        return None
    return {
        "values": values,
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }
