"""What the benchmarks share for their reports: per-run results of the append benchmark,
their summary over repeats (median and range, paired ratios memstream / baseline), the
text rendering, and how a benchmark logs, fails and prints its report."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class BrokenRunError(Exception):
    """The data was not what it should be (what was stored, or what a step left): no
    figures are reported."""


@dataclass
class Result:
    system: str
    label: str
    batch: int
    messages: int
    throughput: float  # messages / (first publish started -> last message applied)
    duration_s: float
    publish_rate: float  # messages / (first publish started -> last publish returned)
    latency_ms: dict[str, float]  # publish call started -> applied
    cpu_us_per_msg: dict[str, float | None]
    redis_calls_per_msg: float
    redis_top_calls: dict[str, int]
    background_cores: float | None  # CPUs other processes kept busy meanwhile
    redis_bytes_per_msg: float  # Redis memory grown per message, right after the run
    sdk_latency_ms: dict[str, float] | None = None  # wait: publish(wait=True) returned
    # wait: how long publish(wait=True) returned after the last message of its call was
    # applied (the SDK's own waiting: polling, one outcome after another)
    wait_overhead_ms: dict[str, float] | None = None
    clock: dict[str, float] = field(default_factory=dict)
    checked: str = ""
    workers: int = 0  # memstream: appender worker processes
    # paced runs: how late sends started behind the open-loop schedule (ms)
    pacing_ms: dict[str, float] | None = None


def one_line(r: Result) -> str:
    text = (
        f"{r.throughput:,.0f} msg/s, p50 {r.latency_ms['p50']:.1f} ms, "
        f"p99 {r.latency_ms['p99']:.1f} ms (published at {r.publish_rate:,.0f} msg/s)"
    )
    if r.sdk_latency_ms:
        text += (
            f"; seen by publish(wait=True): p50 {r.sdk_latency_ms['p50']:.1f} ms, "
            f"p99 {r.sdk_latency_ms['p99']:.1f} ms"
        )
    if r.wait_overhead_ms:
        text += (
            f"; returned {r.wait_overhead_ms['p50']:.1f} ms (p50), "
            f"{r.wait_overhead_ms['p99']:.1f} ms (p99) after its last message was applied"
        )
    return text


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def find(results: list[Result], system: str, label: str) -> Result:
    return next(r for r in results if (r.system, r.label) == (system, label))


def find_baseline(results: list[Result], batch: int) -> Result:
    return next(r for r in results if r.system == "baseline" and r.batch == batch)


def summarize(runs: list[list[Result]]) -> dict[str, Any]:
    """Median and range over the repeats of each figure, and of the per-repeat ratios
    memstream / baseline (each pair ran back to back on the same server, with the same
    batch size). With wait, memstream's latency is what publish(wait=True) took."""
    out: dict[str, Any] = {}
    for system, label in [(r.system, r.label) for r in runs[0]]:
        rs = [find(results, system, label) for results in runs]
        entry: dict[str, Any] = {
            "batch": rs[0].batch,
            "messages": rs[0].messages,
            "throughput": spread([r.throughput for r in rs]),
            "p50_ms": spread([r.latency_ms["p50"] for r in rs]),
            "p99_ms": spread([r.latency_ms["p99"] for r in rs]),
            "publish_rate": spread([r.publish_rate for r in rs]),
            "background_cores": [r.background_cores for r in rs],
        }
        if rs[0].workers:
            entry["workers"] = rs[0].workers
        if rs[0].pacing_ms is not None:
            entry["late_p99_ms"] = spread([(r.pacing_ms or {})["p99"] for r in rs])
            entry["most_in_flight"] = [(r.pacing_ms or {})["most_in_flight"] for r in rs]
        if rs[0].sdk_latency_ms is not None:
            entry["sdk_p50_ms"] = spread([(r.sdk_latency_ms or {})["p50"] for r in rs])
            entry["sdk_p99_ms"] = spread([(r.sdk_latency_ms or {})["p99"] for r in rs])
            entry["wait_overhead_p50_ms"] = spread([(r.wait_overhead_ms or {})["p50"] for r in rs])
            entry["wait_overhead_p99_ms"] = spread([(r.wait_overhead_ms or {})["p99"] for r in rs])
        out.setdefault(label, {})[system] = entry
    for label, pair in out.items():
        if "memstream" not in pair:
            continue
        pairs: list[tuple[Result, Result]] = []
        for results in runs:
            m = find(results, "memstream", label)
            pairs.append((m, find_baseline(results, m.batch)))

        def lat(m: Result, which: str) -> float:
            return m.sdk_latency_ms[which] if m.sdk_latency_ms else m.latency_ms[which]

        pair["ratio"] = {
            "against": f"baseline {pairs[0][1].label} (batch {pairs[0][1].batch})",
            "throughput": spread([m.throughput / b.throughput for m, b in pairs]),
            "p50": spread([lat(m, "p50") / b.latency_ms["p50"] for m, b in pairs]),
            "p99": spread([lat(m, "p99") / b.latency_ms["p99"] for m, b in pairs]),
        }
    return out


def cross_ratios(runs: list[list[Result]]) -> dict[str, Any]:
    """Throughput ratios between scenarios of the same run, then their median and range:
    batched memstream against the peer, and with more appender workers against one."""
    pairs = {
        "batched_vs_peer": (("memstream", "batched"), "peer"),
        "scaled_vs_batched": (("memstream", "scaled"), ("memstream", "batched")),
    }
    out: dict[str, Any] = {}
    for name, (top, bottom) in pairs.items():
        values: list[float] = []
        for results in runs:
            upper = [r for r in results if (r.system, r.label) == top]
            lower = [
                r
                for r in results
                if (r.label == bottom if isinstance(bottom, str) else (r.system, r.label) == bottom)
            ]
            if upper and lower:
                values.append(upper[0].throughput / lower[0].throughput)
        if values:
            out[name] = spread(values)
    return out


# --- output ---------------------------------------------------------------------------


def fmt(s: dict[str, float], digits: int = 1, repeat: int = 1) -> str:
    if repeat == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]"


def row(name: str, system: str, throughput: str, p50: str, p99: str) -> str:
    return f"{name:<30}{system:<30}{throughput:>26}{p50:>24}{p99:>26}"


def render(report: dict[str, Any]) -> str:
    c, rd, mc = report["config"], report["redis"], report["machine"]
    n = c["repeat"]
    where = "temporary redis-server" if rd["temporary"] else "given server"
    aof = "" if rd["aof"] is None else (", AOF on" if rd["aof"] else ", AOF off")
    lines = [
        f"memstream append benchmark (source {report['source']})",
        f"  Redis {rd['version']} ({where}{aof}) at {rd['url']}",
        f"  machine: {mc['cpus']} CPUs ({mc['cpu_model']}), {mc['platform']}, "
        f"Python {mc['python']}; load average {mc['loadavg_start']} -> {mc['loadavg_end']}",
        f"  N={c['messages']:,} messages over M={c['memories']} memories, batch {c['batch']}, "
        f"{c['producers']} producers, {c['workers']} appender worker process(es), "
        f"{c['partitions']} partitions, appender batch {c['appender_batch']}, "
        f"{c['content_bytes']} B content"
        + (f", offered {c['rate']:,.0f} msg/s" if c["rate"] else ", unpaced"),
        f"  figures: median of {n} run(s)" + (" [min-max]" if n > 1 else ""),
        "  latency: publish call started -> applied (memstream: the stored message's 'at')",
        "",
        row("scenario", "system", "throughput msg/s", "p50 ms", "p99 ms"),
    ]
    for label, pair in report["summary"].items():
        name = ""
        others = sorted(set(pair) - {"baseline", "memstream", "ratio"})
        for system in ("baseline", "memstream", *others):
            if system not in pair:
                continue
            e = pair[system]
            name = "" if name else f"{label}: batch {e['batch']}, N={e['messages']:,}"
            workers = e.get("workers")
            workers = f", {workers} worker{'s' if workers != 1 else ''}" if workers else ""
            lines.append(
                row(
                    name,
                    system + workers,
                    fmt(e["throughput"], 0, n),
                    fmt(e["p50_ms"], 2, n),
                    fmt(e["p99_ms"], 2, n),
                )
            )
            if "sdk_p50_ms" in e:
                lines.append(
                    row(
                        "",
                        "  publish(wait=True) returned",
                        "",
                        fmt(e["sdk_p50_ms"], 2, n),
                        fmt(e["sdk_p99_ms"], 2, n),
                    )
                )
                lines.append(
                    row(
                        "",
                        "  ... after the last apply",
                        "",
                        fmt(e["wait_overhead_p50_ms"], 2, n),
                        fmt(e["wait_overhead_p99_ms"], 2, n),
                    )
                )
        if "ratio" in pair:
            ra = pair["ratio"]
            lines.append(
                row(
                    "",
                    "ratio memstream/baseline",
                    fmt(ra["throughput"], 3, n),
                    fmt(ra["p50"], 1, n),
                    fmt(ra["p99"], 1, n),
                )
            )
    names = {
        "batched_vs_peer": "batched memstream / peer, throughput",
        "scaled_vs_batched": "batched memstream, more workers / one, throughput",
    }
    for key, value in report.get("ratios", {}).items():
        lines.append(f"{names.get(key, key):<60}{fmt(value, 3, n):>26}")
    for key, note in report.get("peers", {}).items():
        lines.append(f"peer {key}: {note}")
    late = [
        f"{label} {system} {fmt(e['late_p99_ms'], 2, n)} (most in flight {e['most_in_flight']})"
        for label, pair in report["summary"].items()
        for system, e in pair.items()
        if "late_p99_ms" in e
    ]
    if late:
        lines.append(
            "open loop: how late sends started behind schedule, p99 ms: " + "; ".join(late)
        )
    lines.append("")
    lines.append(
        "per run: CPU us per message (producer process / appender workers / Redis), Redis "
        "commands and Redis memory per message, CPUs kept busy by other processes meanwhile:"
    )
    for i, results in enumerate(report["runs"]):
        for r in results:
            cpu = r["cpu_us_per_msg"]
            workers = cpu["workers"] if r["system"] == "memstream" else "-"
            lines.append(
                f"  run {i + 1} {r['system']:<10} {r['label']:<8} {cpu['producer']} / {workers} / "
                f"{cpu['redis']}; {r['redis_calls_per_msg']:.1f} commands; "
                f"{r['redis_bytes_per_msg']:,.0f} B; background {r['background_cores']}"
            )
    lines.append("checked: " + "; ".join(sorted({r["checked"] for r in report["runs"][-1]})))
    return "\n".join(lines)


def emit(
    report: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    *,
    save: Path | None,
    as_json: bool,
) -> None:
    """Write the report to ``save`` (JSON) if given, and print it as JSON or as text."""
    if save:
        save.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if as_json else render(report))


def add_report_arguments(parser: argparse.ArgumentParser, resources: Path) -> None:
    """The options every benchmark has: its memory resources and where the report goes."""
    parser.add_argument("--resources", type=Path, default=resources, help="memory resources folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--save", type=Path, help="also write the JSON report to this file")


def finish(
    run: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    *,
    save: Path | None,
    as_json: bool,
) -> int:
    """Run a benchmark and emit its report: the exit code (2: no figures)."""
    try:
        report = asyncio.run(run())
    except ValidationError as e:
        log(f"invalid settings: {e}")
        return 2
    except BrokenRunError as e:
        log(f"broken run, no figures: {e}")
        return 2
    emit(report, render, save=save, as_json=as_json)
    return 0
