"""How a suite run reads: the goals table as text (the suite's output) and as Markdown
(the README's Performance table), from the run's JSON."""

from __future__ import annotations

from typing import Any


def number(value: float, unit: str) -> str:
    if unit != "x":  # bytes, calls: whole numbers
        return f"{value:,.0f}"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"


def suffix(unit: str) -> str:
    return "x" if unit == "x" else f" {unit}"


def measured(row: dict[str, Any], repeat: int) -> str:
    r = row["ratio"]
    if r is None:
        return str(row.get("note", "not measured"))
    unit = row["unit"]
    text = number(r["median"], unit) + suffix(unit)
    if repeat > 1:
        text += f" ({number(r['min'], unit)}-{number(r['max'], unit)})"
    return text


def bound(row: dict[str, Any]) -> str:
    if row["target"] is None:
        return "none set"
    op = "≥" if row["op"] == ">=" else "≤"
    return f"{op} {number(row['target'], row['unit'])}{suffix(row['unit'])}"


def verdict(row: dict[str, Any], notes: list[str] | None = None) -> str:
    """Met or not; with ``notes``, a row's caveats are collected there and referenced."""
    if row["ratio"] is None:
        return "not measured"
    text = {True: "met", False: "not met", None: "-"}[row["met"]]
    if notes is not None and row.get("caveats"):
        for caveat in row["caveats"]:
            if caveat not in notes:
                notes.append(caveat)
        text += "".join(f" [{notes.index(c) + 1}]" for c in row["caveats"])
    return text


def busy(run: dict[str, Any], scenario: str) -> str:
    b = run["background_cores"].get(scenario)
    return "-" if not b else f"{b['median']:.2f} (max {b['max']:.2f})"


def header(run: dict[str, Any]) -> list[str]:
    m = run["machine"]
    redis = ", ".join(run["redis"]["versions"]) or "?"
    lines = [
        f"source {run['source']}, started {run['started']} ({run['seconds']} s); "
        f"{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, Redis {redis}",
        f"each ratio is taken within one run against a baseline of the same run; median of "
        f"{run['repeat']} run(s)" + (" (min-max)" if run["repeat"] > 1 else ""),
        f"load average {m['loadavg_start']} -> {m['loadavg_end']}; other processes kept "
        + "; ".join(f"{k} {busy(run, k)}" for k in run["background_cores"])
        + " CPUs busy (median, max over the timed windows)",
    ]
    if run.get("quick"):
        lines.append("QUICK run: small sizes, for checking the suite, not for figures")
    if run.get("note"):
        lines.append(f"note: {run['note']}")
    return lines


def render(run: dict[str, Any]) -> str:
    """The suite's text table."""
    notes: list[str] = []
    table = [("scenario", "goal", "bound", "measured", "met")] + [
        (r["scenario"], r["goal"], bound(r), measured(r, run["repeat"]), verdict(r, notes))
        for r in run["goals"]
    ]
    widths = [max(len(cells[i]) for cells in table) for i in range(5)]
    lines = [*header(run), ""]
    for cells in table:
        lines.append(
            "  ".join(
                c.rjust(w) if i == 2 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    lines += [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def markdown(run: dict[str, Any], path: str) -> str:
    """The README's Performance table, naming the run it comes from."""
    m = run["machine"]
    redis = ", ".join(run["redis"]["versions"]) or "?"
    spread = " (min-max)" if run["repeat"] > 1 else ""
    runs = f"{run['repeat']} run{'s' if run['repeat'] > 1 else ''}"
    lines = [
        f"Measured at source commit `{run['source']}` on {run['started'][:10]}: {m['cpus']} CPUs "
        f"({m['cpu_model']}), Python {m['python']}, Redis {redis}, every process of a scenario "
        f"(producers, workers, Redis) on the same CPUs. Each figure is the median{spread} of "
        f"{runs} of a ratio taken within one run, against a baseline of that run. "
        f"Run file: [`{path}`]({path}).",
    ]
    if run.get("note"):
        lines += ["", f"**{run['note']}**"]
    lines += [
        "",
        "| scenario | goal | bound | measured | met | other CPUs busy, median (max) |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    notes: list[str] = []
    for r in run["goals"]:
        lines.append(
            f"| {r['scenario']} | {r['goal']} | {bound(r)} | {measured(r, run['repeat'])} | "
            f"{verdict(r, notes)} | {busy(run, r['scenario'])} |"
        )
    if notes:
        lines += ["", *[f"[{i + 1}] {note}" for i, note in enumerate(notes)]]
    return "\n".join(lines)
