"""Every hot-path goal in one run: each benchmark runs as its own process with --json,
the suite reads the ratios from their reports and prints one table (goal, ratio:
median and min-max, met or not). ``--save FILE`` keeps the whole run (every report,
the source commit, the machine, Redis and the background CPU each scenario saw).
See benchmarks/README.md.

    .venv/bin/python benchmarks/suite.py --save benchmarks/results/run.json
    .venv/bin/python benchmarks/suite.py --quick                 # small and once: a check
    .venv/bin/python benchmarks/suite.py --only latency,space
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goals import background, rows_for
from harness import load_average, machine_info, source_version
from report import log
from table import render

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Step:
    """One scenario: a benchmark script and its arguments (full size, and --quick)."""

    name: str
    script: str
    args: tuple[str, ...]
    quick: tuple[str, ...]
    owned: bool = True  # False: another script's owners keep it; it may not exist yet


STEPS: tuple[Step, ...] = (
    Step(
        "throughput",
        "append.py",
        ("--mode", "batched", "--scale-workers", "2", "--peer", "langchain"),
        ("--messages", "2000"),
    ),
    Step(
        "latency",
        "append.py",
        ("--mode", "single,wait", "--rate", "1000", "--messages", "5000"),
        ("--messages", "1000", "--wait-messages", "500"),
    ),
    Step("space", "space.py", (), ("--memories", "50", "--messages", "5")),
    Step("producer", "producer.py", (), ("--messages", "2000")),
    Step("counting", "accountant.py", ("--messages", "10000"), ("--messages", "1000")),
    Step("reads", "read.py", (), ("--calls", "200", "--large", "2000"), owned=False),
    Step("waiters", "waiters.py", (), (), owned=False),
)


def merged(args: Sequence[str], override: Sequence[str]) -> list[str]:
    """``args`` with the values of ``override``'s options put in (``--name value`` pairs;
    a flag without a value is kept as it is)."""
    out = list(args)
    i = 0
    while i < len(override):
        name = override[i]
        value = override[i + 1] if i + 1 < len(override) else None
        if value is None or value.startswith("--"):
            out.append(name)
            i += 1
            continue
        if name in out:
            out[out.index(name) + 1] = value
        else:
            out += [name, value]
        i += 2
    return out


def command(step: Step, repeat: int, quick: bool, redis_url: str | None) -> list[str]:
    args = merged(step.args, [*(step.quick if quick else ()), "--repeat", str(repeat)])
    if redis_url:
        args += ["--redis-url", redis_url]
    return [sys.executable, str(HERE / step.script), *args, "--json"]


def run_step(step: Step, repeat: int, quick: bool, redis_url: str | None) -> dict[str, Any]:
    """The step's report (its own process; its log goes to this one's stderr as it
    runs), or why there is none."""
    if not (HERE / step.script).exists():
        return {"report": None, "note": f"not measured: benchmarks/{step.script} does not exist"}
    cmd = command(step, repeat, quick, redis_url)
    log(f"== {step.name}: {' '.join(Path(a).name if a.startswith('/') else a for a in cmd)}")
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    out: dict[str, Any] = {
        "command": [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in cmd],
        "exit": done.returncode,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if done.returncode != 0:
        return {
            **out,
            "report": None,
            "note": f"not measured: {step.script} exited with {done.returncode} (its log is above)",
        }
    try:
        return {**out, "report": json.loads(done.stdout)}
    except json.JSONDecodeError:
        return {**out, "report": None, "note": f"not measured: {step.script} printed no JSON"}


def redis_versions(steps: dict[str, dict[str, Any]]) -> list[str]:
    found = {
        str(s["report"]["redis"]["version"])
        for s in steps.values()
        if isinstance(s.get("report"), dict) and isinstance(s["report"].get("redis"), dict)
    }
    return sorted(found)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    chosen = [s for s in STEPS if not opts.only or s.name in opts.only]
    started = datetime.datetime.now(datetime.UTC)
    load_start = load_average()
    steps = {s.name: run_step(s, opts.repeat, opts.quick, opts.redis_url) for s in chosen}
    rows = [
        r
        for s in chosen
        for r in rows_for(s.name, steps[s.name]["report"], steps[s.name].get("note", ""))
    ]
    return {
        "suite": "memstream hot-path goals",
        "note": opts.note,
        "source": source_version(ROOT),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.UTC) - started).total_seconds()),
        "repeat": opts.repeat,
        "quick": opts.quick,
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_average()},
        "redis": {"versions": redis_versions(steps), "url": opts.redis_url or "temporary servers"},
        "background_cores": {
            name: background(s["report"]) for name, s in steps.items() if s["report"] is not None
        },
        "goals": rows,
        "scenarios": steps,
    }


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="every hot-path goal of memstream, in one run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each scenario (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes (use with --repeat 1)")
    p.add_argument(
        "--only",
        type=lambda v: set(v.split(",")),
        help="these scenarios only, by name: " + ",".join(s.name for s in STEPS),
    )
    p.add_argument("--redis-url", help="every scenario on this server (default: temporary ones)")
    p.add_argument("--note", default="", help="a label kept in the saved run (e.g. the load)")
    p.add_argument("--save", type=Path, help="write the whole run as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the whole run as JSON")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    unknown = (a.only or set()) - {s.name for s in STEPS}
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    result = run(opts)
    if opts.save:
        opts.save.parent.mkdir(parents=True, exist_ok=True)
        opts.save.write_text(json.dumps(result, indent=2) + "\n")
        log(f"saved to {opts.save}")
    print(json.dumps(result, indent=2) if opts.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
