"""Waiters benchmark: many concurrent ``publish(wait=True)`` callers in one process, and
the latency of one ``publish(wait=True)`` against the RPUSH round trip, on one Redis
server, in one run. See benchmarks/README.md for the method and the figures.

    .venv/bin/python benchmarks/waiters.py --repeat 3
    .venv/bin/python benchmarks/waiters.py --callers 2000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from append import RESOURCE, TENANT, event_for, warm_up
from harness import (
    ClockOffset,
    Meter,
    RedisTarget,
    WorkerError,
    WorkerPool,
    calibrate,
    delete_keys,
    fresh_namespace,
    load_average,
    machine_info,
    now_ms,
    redis_info,
    source_version,
)
from report import BrokenRunError, add_report_arguments, emit, log, spread
from workload import Item, index_of, memory_key, message_for, summary

from events import Publisher
from memory import MemoryRef
from processors.settings import Settings
from store import Keys, MemoryReader, RedisClient, Scripts, connect, describe
from store.connection import breaker_of

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Options:
    callers: int
    memories: int
    single: int
    partitions: int
    workers: int
    mode: str
    repeat: int
    content_bytes: int
    redis_url: str | None
    aof: bool
    timeout: float
    resources: Path
    json: bool
    save: Path | None = None
    worker_command: tuple[str, ...] = ()


@dataclass
class Result:
    scenario: str  # rpush | single | concurrent
    calls: int
    completed: int  # calls that returned (memstream: with an outcome that is ok)
    latency_ms: dict[str, float]  # of the calls that completed
    wall_s: float  # first call started -> last call returned
    errors: dict[str, int] = field(default_factory=dict)  # error type -> calls
    error_sample: dict[str, str] = field(default_factory=dict)  # error type -> one message
    breaker_opens: int = 0  # openings of the client's circuit breaker during the scenario
    breaker_worst: str = "closed"  # the worst state it was in
    breaker_final: str = "closed"
    stored: int = 0  # messages stored (memstream), failed calls' included
    # memstream, calls that completed: call started -> applied (the stored message's
    # "at"), and applied -> the call returned (the SDK's waiting), Redis clock
    applied_ms: dict[str, float] = field(default_factory=dict)
    after_apply_ms: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)  # the outcome poller's counters
    cpu_us_per_call: dict[str, float | None] = field(default_factory=dict)
    redis_calls_per_call: float = 0.0
    redis_top_calls: dict[str, int] = field(default_factory=dict)
    background_cores: float | None = None
    checked: str = ""


# --- the baseline: one RPUSH per call, one call after another ---------------------------


async def run_rpush(opts: Options, url: str) -> Result:
    prefix = fresh_namespace("bench-rpush")
    client = connect(url)
    text = message_for(Item(0, 0), opts.content_bytes).model_dump_json()
    try:
        for _ in range(100):  # warm the connection
            await client.rpush(f"{prefix}:warmup", text)
        latencies: list[float] = []
        meter = Meter(client)
        before = await meter.snapshot()
        start = now_ms()
        lists = [f"{prefix}:{TENANT}/{RESOURCE}/{memory_key(m)}" for m in range(opts.memories)]
        for i in range(opts.single):
            t0 = now_ms()
            await client.rpush(lists[i % opts.memories], text)
            latencies.append(now_ms() - t0)
        wall = (now_ms() - start) / 1000
        usage = meter.usage(before, await meter.snapshot(), opts.single)
        stored = sum([int(await client.llen(key)) for key in lists])
        if stored != opts.single:
            raise BrokenRunError(f"rpush: {stored} of {opts.single} messages stored")
        return Result(
            scenario="rpush",
            calls=opts.single,
            completed=opts.single,
            latency_ms=summary(latencies),
            wall_s=wall,
            stored=stored,
            cpu_us_per_call=usage.cpu_us_per_msg,
            redis_calls_per_call=usage.redis_calls_per_msg,
            redis_top_calls=usage.redis_top_calls,
            background_cores=usage.background_cores,
            checked="every RPUSH stored",
        )
    finally:
        with contextlib.suppress(Exception):
            await delete_keys(client, f"{prefix}:*")
        await client.aclose()


# --- memstream: publish(wait=True) -> ingest:{p} -> appender processes -> outcome ----------


class Calls:
    """What the callers saw: latencies of the calls that completed, errors by type."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self.ok: dict[tuple[int, int], str] = {}  # (memory, index) -> token
        self.times: dict[str, tuple[float, float]] = {}  # token -> call started, returned
        self.starts: list[float] = []
        self.ends: list[float] = []

    async def call(self, publisher: Publisher, item: Item, opts: Options) -> None:
        event = event_for(TENANT, item, message_for(item, opts.content_bytes))
        t0 = now_ms()
        self.starts.append(t0)
        try:
            published = await publisher.publish(event, wait=True, timeout=opts.timeout)
        except Exception as e:  # counted and reported: the figure this benchmark is for
            name = type(e).__name__
            self.errors[name] += 1
            self.samples.setdefault(name, str(e)[:300])
            return
        finally:
            self.ends.append(now_ms())
        outcome, receipt = published.outcome, published.receipt
        if outcome is None or not outcome.ok or receipt is None:
            self.errors["not applied"] += 1
            self.samples.setdefault("not applied", str(outcome))
            return
        t1 = now_ms()
        self.latencies.append(t1 - t0)
        self.ok[(item.memory, item.index)] = receipt.token
        self.times[receipt.token] = (t0, t1)

    def breakdown(
        self, applied_at: dict[str, int], clock: ClockOffset
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Per completed call: started -> applied, applied -> returned (ms). "at" is the
        Redis clock in whole ms, floored, when the apply script ran: +0.5 is the middle
        of that millisecond."""
        applied, after = [], []
        for token, (t0, t1) in self.times.items():
            at = applied_at[token] + 0.5
            applied.append(at - clock.to_server(t0))
            after.append(clock.to_server(t1) - at)
        return summary(applied), summary(after)


async def stored_items(
    client: RedisClient, scripts: Scripts, keys: Keys, opts: Options, items: Sequence[Item]
) -> tuple[set[tuple[int, int]], dict[str, int], list[str]]:
    """The (memory, index) of every stored message and the apply time ("at") of each
    by its token; problems: a message stored twice, or one that was never published;
    dead letters."""
    reader = MemoryReader(client, scripts, keys)
    published = {(i.memory, i.index) for i in items}
    stored: set[tuple[int, int]] = set()
    applied_at: dict[str, int] = {}
    problems: list[str] = []
    for m in sorted({i.memory for i in items}):
        view = await reader.read(MemoryRef(TENANT, RESOURCE, memory_key(m)))
        for msg in view.messages:
            key = (m, index_of(msg.content))
            if key in stored:
                problems.append(f"memory {m}: message {key[1]} stored twice")
            elif key not in published:
                problems.append(f"memory {m}: message {key[1]} was never published")
            stored.add(key)
            applied_at[f"{view.partition}/{msg.entry}"] = msg.at
    pipe = client.pipeline(transaction=False)
    for p in range(opts.partitions):
        pipe.xlen(keys.dlq(p))
    letters = sum(int(n) for n in await pipe.execute())
    if letters:
        problems.append(f"{letters} dead letters")
    return stored, applied_at, problems


def poller_counters(client: RedisClient) -> dict[str, int]:
    """The outcome poller's counters (ticks, round trips, entries asked), when the code
    under test has one."""
    poller = getattr(client, "outcome_poller", None)
    counters = getattr(poller, "counters", None)
    return dict(counters()) if callable(counters) else {}


async def drive(publisher: Publisher, opts: Options, scenario: str, items: list[Item]) -> Calls:
    """``single``: one call after another; ``concurrent``: every call at once."""
    calls = Calls()
    if scenario == "single":
        for item in items:
            await calls.call(publisher, item, opts)
        return calls
    go = asyncio.Event()

    async def caller(item: Item) -> None:
        await go.wait()
        await calls.call(publisher, item, opts)

    async with asyncio.TaskGroup() as tg:
        for item in items:
            tg.create_task(caller(item))
        await asyncio.sleep(0)  # every caller is waiting for the start
        go.set()
    return calls


class BreakerWatch:
    """What the callers' circuit breaker did during a scenario."""

    ORDER = ("closed", "half-open", "open")

    def __init__(self, client: RedisClient) -> None:
        self.breaker = breaker_of(client)
        self.states: list[str] = []
        if self.breaker is not None:
            self.breaker.add_listener(lambda state: self.states.append(state.label))
        self.opens_before = self.breaker.opens if self.breaker is not None else 0

    def figures(self) -> dict[str, Any]:
        if self.breaker is None:
            return {"breaker_opens": 0, "breaker_worst": "none", "breaker_final": "none"}
        return {
            "breaker_opens": self.breaker.opens - self.opens_before,
            "breaker_worst": max(self.states or ["closed"], key=self.ORDER.index),
            "breaker_final": self.breaker.state.label,
        }


async def run_memstream(opts: Options, url: str, scenario: str, log_dir: Path) -> Result:
    """``single``: one caller, ``--single`` publishes one after another; ``concurrent``:
    ``--callers`` callers, one publish each, all started at once."""
    namespace = fresh_namespace("bench-wait")
    keys = Keys(namespace)
    pool = WorkerPool(
        url, namespace, opts.resources, opts.partitions, opts.workers, log_dir, opts.worker_command
    )
    client = connect(url)  # the callers'
    observer = connect(url)  # set-up, CPU accounting and checks, apart from the callers'
    pool.start()
    try:
        await pool.wait_ready(observer)
        scripts = Scripts(client)
        await scripts.load()
        publisher = Publisher(client, keys=keys, scripts=scripts)
        if await publisher.partitions() != opts.partitions:
            raise BrokenRunError("the workers stored another partition count")
        await warm_up(publisher, 200, opts.timeout, 0)
        count = opts.single if scenario == "single" else opts.callers
        items = [Item(g % opts.memories, g // opts.memories) for g in range(count)]
        breaker = BreakerWatch(client)
        counters_before = poller_counters(client)
        clock = await calibrate(observer)
        meter = Meter(observer, pool)
        before = await meter.snapshot()
        calls = await drive(publisher, opts, scenario, items)
        usage = meter.usage(before, await meter.snapshot(), count)
        counters_after = poller_counters(client)
        pool.check_alive()
        stored, applied_at, problems = await stored_items(
            observer, Scripts(observer), keys, opts, items
        )
        missing = [k for k in calls.ok if k not in stored]
        if missing:
            problems.append(f"{len(missing)} calls returned 'applied' but are not stored")
        if problems:
            raise BrokenRunError(f"memstream {scenario}: " + "; ".join(problems[:5]))
        applied, after = calls.breakdown(applied_at, clock) if calls.ok else ({}, {})
        return Result(
            scenario=scenario,
            calls=count,
            completed=len(calls.ok),
            latency_ms=summary(calls.latencies) if calls.latencies else {},
            wall_s=(max(calls.ends) - min(calls.starts)) / 1000,
            errors=dict(calls.errors),
            error_sample=calls.samples,
            **breaker.figures(),
            stored=len(stored),
            applied_ms=applied,
            after_apply_ms=after,
            waiting={k: v - counters_before.get(k, 0) for k, v in counters_after.items()},
            cpu_us_per_call=usage.cpu_us_per_msg,
            redis_calls_per_call=usage.redis_calls_per_msg,
            redis_top_calls=usage.redis_top_calls,
            background_cores=usage.background_cores,
            checked="every message stored at most once; every call that returned 'applied' "
            "is stored; no dead letters",
        )
    finally:
        pool.stop()
        with contextlib.suppress(Exception):
            await delete_keys(observer, f"{namespace}:*")
        await client.aclose()
        await observer.aclose()


# --- the run --------------------------------------------------------------------------


def scenarios(opts: Options) -> list[str]:
    return {
        "all": ["rpush", "single", "concurrent"],
        "single": ["rpush", "single"],
        "concurrent": ["concurrent"],
    }[opts.mode]


def summarize(runs: list[list[Result]]) -> dict[str, Any]:
    """Median and range over the repeats; the p50 ratio single / rpush per run."""
    out: dict[str, Any] = {}
    for name in [r.scenario for r in runs[0]]:
        rs = [next(r for r in results if r.scenario == name) for results in runs]
        timed = [r for r in rs if r.latency_ms]
        out[name] = {
            "calls": rs[0].calls,
            "completed": spread([r.completed for r in rs]),
            "errors": [sum(r.errors.values()) for r in rs],
            "breaker_opens": [r.breaker_opens for r in rs],
            "p50_ms": spread([r.latency_ms["p50"] for r in timed]) if timed else None,
            "p99_ms": spread([r.latency_ms["p99"] for r in timed]) if timed else None,
            "wall_s": spread([r.wall_s for r in rs]),
            "background_cores": [r.background_cores for r in rs],
        }
        if all(r.after_apply_ms for r in rs):
            out[name]["applied_p50_ms"] = spread([r.applied_ms["p50"] for r in rs])
            out[name]["after_apply_p50_ms"] = spread([r.after_apply_ms["p50"] for r in rs])
            out[name]["after_apply_p99_ms"] = spread([r.after_apply_ms["p99"] for r in rs])
        rounds = [r.waiting.get("round_trips") for r in rs]
        if all(v is not None for v in rounds):
            out[name]["wait_round_trips"] = spread([float(v or 0) for v in rounds])
    if "rpush" in out and "single" in out:
        ratios = []
        for results in runs:
            base = next(r for r in results if r.scenario == "rpush")
            single = next(r for r in results if r.scenario == "single")
            if single.latency_ms:
                ratios.append(single.latency_ms["p50"] / base.latency_ms["p50"])
        if ratios:
            out["single"]["p50_ratio_to_rpush"] = spread(ratios)
    return out


def fmt(s: dict[str, float] | None, digits: int, repeat: int) -> str:
    if s is None:
        return "-"
    if repeat == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]"


def render(report: dict[str, Any]) -> str:
    c, rd, mc = report["config"], report["redis"], report["machine"]
    n = c["repeat"]
    where = "temporary redis-server" if rd["temporary"] else "given server"
    lines = [
        f"memstream waiters benchmark (source {report['source']})",
        f"  Redis {rd['version']} ({where}) at {rd['url']}",
        f"  machine: {mc['cpus']} CPUs ({mc['cpu_model']}), {mc['platform']}, "
        f"Python {mc['python']}; load average {mc['loadavg_start']} -> {mc['loadavg_end']}",
        f"  {c['callers']:,} concurrent callers, {c['single']} sequential calls, "
        f"{c['memories']} memories, {c['workers']} appender process(es), "
        f"{c['partitions']} partitions, {c['content_bytes']} B content",
        f"  figures: median of {n} run(s)" + (" [min-max]" if n > 1 else ""),
        "",
        f"{'scenario':<12}{'calls':>7}{'completed':>20}{'p50 ms':>24}{'p99 ms':>24}"
        f"{'wall s':>22}  errors / breaker openings per run",
    ]
    for name, e in report["summary"].items():
        lines.append(
            f"{name:<12}{e['calls']:>7}{fmt(e['completed'], 0, n):>20}{fmt(e['p50_ms'], 2, n):>24}"
            f"{fmt(e['p99_ms'], 2, n):>24}{fmt(e['wall_s'], 2, n):>22}  "
            f"{e['errors']} / {e['breaker_opens']}"
        )
    for name, e in report["summary"].items():
        if "after_apply_p50_ms" in e:
            lines.append(
                f"  {name}: call started -> applied p50 {fmt(e['applied_p50_ms'], 2, n)} ms; "
                f"applied -> call returned p50 {fmt(e['after_apply_p50_ms'], 2, n)} ms, "
                f"p99 {fmt(e['after_apply_p99_ms'], 2, n)} ms"
            )
    single = report["summary"].get("single", {})
    if "p50_ratio_to_rpush" in single:
        lines.append("")
        lines.append(
            f"single publish(wait=True) p50 / RPUSH round trip p50: "
            f"{fmt(single['p50_ratio_to_rpush'], 1, n)} (goal: at most 4)"
        )
    lines.append("")
    lines.append(
        "per run: CPU us per call (this process / appender workers / Redis), Redis commands "
        "per call, outcome poller (ticks, round trips, entries asked), CPUs busy elsewhere:"
    )
    for i, results in enumerate(report["runs"]):
        for r in results:
            cpu = r["cpu_us_per_call"]
            errors = ", ".join(f"{k} x{v}" for k, v in r["errors"].items()) or "no errors"
            lines.append(
                f"  run {i + 1} {r['scenario']:<10} {cpu.get('producer')} / {cpu.get('workers')} / "
                f"{cpu.get('redis')}; {r['redis_calls_per_call']:.1f} commands; "
                f"poller {r['waiting'] or '-'}; background {r['background_cores']}; "
                f"breaker worst {r['breaker_worst']}, final {r['breaker_final']}; {errors}"
            )
            for name, sample in r["error_sample"].items():
                lines.append(f"      {name}: {sample[:160]}")
    lines.append("checked: " + "; ".join(sorted({r["checked"] for r in report["runs"][-1]})))
    return "\n".join(lines)


async def run(opts: Options, settings: Settings) -> dict[str, Any]:
    target = (
        RedisTarget(opts.redis_url, "", False)
        if opts.redis_url
        else RedisTarget.start(appendonly=opts.aof)
    )
    log_dir = Path(tempfile.mkdtemp(prefix="memstream-bench-logs-"))
    try:
        client = connect(target.url)
        try:
            info = await redis_info(client)
        finally:
            await client.aclose()
        target.version = str(info.get("redis_version", target.version))
        load_start = load_average()
        runs: list[list[Result]] = []
        for r in range(opts.repeat):
            results: list[Result] = []
            for s in scenarios(opts):
                log(f"[{r + 1}/{opts.repeat}] {s} ...")
                if s == "rpush":
                    result = await run_rpush(opts, target.url)
                else:
                    result = await run_memstream(opts, target.url, s, log_dir)
                p50 = result.latency_ms.get("p50", float("nan"))
                p99 = result.latency_ms.get("p99", float("nan"))
                log(
                    f"    {result.completed}/{result.calls} completed, p50 {p50:.2f} ms, "
                    f"p99 {p99:.2f} ms, errors {result.errors or 0}, breaker openings "
                    f"{result.breaker_opens}, poller {result.waiting or '-'}"
                )
                results.append(result)
            runs.append(results)
        report: dict[str, Any] = {
            "benchmark": "waiters",
            "source": source_version(ROOT),
            "config": {
                "callers": opts.callers,
                "single": opts.single,
                "memories": opts.memories,
                "partitions": opts.partitions,
                "workers": opts.workers,
                "content_bytes": opts.content_bytes,
                "timeout_s": opts.timeout,
                "appender_batch": settings.batch_size,
                "repeat": opts.repeat,
            },
            "redis": {
                "version": target.version,
                "url": describe(target.url),
                "temporary": target.started,
                "binary": target.binary,
            },
            "machine": {
                **machine_info(),
                "loadavg_start": load_start,
                "loadavg_end": load_average(),
            },
            "summary": summarize(runs),
            "runs": [[asdict(r) for r in results] for results in runs],
        }
    except BaseException:
        log(f"appender worker logs kept in {log_dir}")
        raise
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    finally:
        target.stop()
    return report


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="memstream: N concurrent publish(wait=True) callers in one process, and "
        "one publish(wait=True) against the RPUSH round trip, on one Redis server",
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--callers", type=int, default=1000, help="concurrent callers (default 1000)")
    p.add_argument("--memories", type=int, default=200, help="memories written (default 200)")
    p.add_argument(
        "--single", type=int, default=500, help="sequential calls of the latency scenarios"
    )
    p.add_argument("--partitions", type=int, default=16, help="partition count (default 16)")
    p.add_argument("--workers", type=int, default=1, help="appender processes (default 1)")
    p.add_argument(
        "--mode",
        choices=["all", "single", "concurrent"],
        default="all",
        help="single: the RPUSH round trip and one publish(wait=True) after another; "
        "concurrent: --callers at once; all (default): both",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of every scenario (default 1)")
    p.add_argument("--content-bytes", type=int, default=200, help="message size (default 200)")
    p.add_argument("--aof", action="store_true", help="temporary server with appendonly yes")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="each publish's wait timeout (default 60 s)"
    )
    add_report_arguments(p, ROOT / "memories")
    p.add_argument(
        "--worker-command",
        default="",
        help="command that runs `memstream` for the workers (default: the venv's memstream)",
    )
    a = p.parse_args(argv)
    for name in ("callers", "memories", "single", "partitions", "workers", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    return Options(
        callers=a.callers,
        memories=a.memories,
        single=a.single,
        partitions=a.partitions,
        workers=a.workers,
        mode=a.mode,
        repeat=a.repeat,
        content_bytes=a.content_bytes,
        redis_url=a.redis_url,
        aof=a.aof,
        timeout=a.timeout,
        resources=a.resources.resolve(),
        json=a.json,
        save=a.save,
        worker_command=tuple(shlex.split(a.worker_command)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    try:
        settings = Settings(partitions=opts.partitions, resources=str(opts.resources))
    except Exception as e:
        log(f"the appender processes would refuse these MEMSTREAM_* settings: {e}")
        return 2
    try:
        report = asyncio.run(run(opts, settings))
    except (BrokenRunError, WorkerError) as e:
        log(f"broken run, no figures: {e}")
        return 2
    emit(report, render, save=opts.save, as_json=opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
