"""Memory operations from the command line: ``write`` (replace a memory atomically),
``append`` (a batch, in one round trip), ``delete``, ``clear`` (with ``--yes``) and
``stats``. Every change travels as an event through the memory's partition, so it is
ordered with the appends of every agent."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from pydantic import TypeAdapter, ValidationError

from events import Publisher
from events.envelope import STREAM_ID_PATTERN, AppendPayload, MemoryName, MessageAppended
from memory import MemoryRef, Message
from processors.app import App
from processors.clitools import EXIT_REFUSED, command, settings_from
from processors.tokenizers import Tokenizers
from store import GenerationChangedError, MemoryReader, Outcome, OutcomeStatus

STATS_PAGE = 500
STATS_RETRIES = 3
_MESSAGES: TypeAdapter[list[Message]] = TypeAdapter(list[Message])


def read_messages(path: str) -> list[Message]:
    """A JSON array of messages from a file (``-``: standard input); errors name the
    file and the message at fault."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint="--file") from e
    try:
        return _MESSAGES.validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise click.BadParameter(
            f"{path}: {where or 'the file'}: {first['msg']} (expected a JSON array of "
            f'messages such as [{{"role": "user", "content": "hi"}}])',
            param_hint="--file",
        ) from e


def _publisher(app: App) -> Publisher:
    return app.publisher()


def _report(what: str, outcomes: Sequence[Outcome | None], as_json: bool) -> None:
    refused = [o for o in outcomes if o is not None and not o.ok]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "operation": what,
                    "outcomes": [
                        None
                        if o is None
                        else {
                            "status": o.status.value,
                            "reason": o.reason,
                            "seq": o.seq,
                            "gen": o.gen,
                            **({"backup": o.backup} if o.backup else {}),
                        }
                        for o in outcomes
                    ],
                }
            )
        )
    else:
        done = sum(1 for o in outcomes if o is not None and o.ok)
        click.echo(f"{what}: {done} applied" + (f", {len(refused)} refused" if refused else ""))
        for o in refused:
            click.echo(f"refused: {o.reason}: {o.detail}", err=True)
    if refused:
        sys.exit(EXIT_REFUSED)


async def write(memory: MemoryRef, path: str, timeout: float, as_json: bool) -> None:
    messages = read_messages(path)
    async with App(settings_from()) as app:
        published = await _publisher(app).replace(memory, messages, wait=True, timeout=timeout)
    _report("write", [published.outcome], as_json)


async def append(memory: MemoryRef, path: str, timeout: float, as_json: bool) -> None:
    messages = read_messages(path)
    name = MemoryName(resource=memory.resource, key=memory.key)
    events = [
        MessageAppended(tenant=memory.tenant, payload=AppendPayload(memory=name, message=m))
        for m in messages
    ]
    async with App(settings_from()) as app:
        published = await _publisher(app).publish_many(events, wait=True, timeout=timeout)
    _report("append", [p.outcome for p in published], as_json)


async def delete(memory: MemoryRef, timeout: float, as_json: bool) -> None:
    async with App(settings_from()) as app:
        published = await _publisher(app).delete(memory, wait=True, timeout=timeout)
    _report("delete", [published.outcome], as_json)


async def clear(memory: MemoryRef, backup: bool, timeout: float, as_json: bool) -> None:
    async with App(settings_from()) as app:
        published = await _publisher(app).clear(memory, backup=backup, wait=True, timeout=timeout)
    outcome = published.outcome
    _report("clear", [outcome], as_json)
    if backup and not as_json and outcome is not None:
        if outcome.backup:
            click.echo(f"backup {outcome.backup} (memstream restore REF {outcome.backup})")
        elif outcome.status is OutcomeStatus.APPLIED:
            click.echo("nothing to back up: the memory held no messages")
        else:
            click.echo(f"no backup made by this request ({outcome.status.value})")


async def restore(memory: MemoryRef, backup_id: str, timeout: float, as_json: bool) -> None:
    """Replace the memory with its backup, decided in its partition (in order with erases:
    an erase published before stays erased; summaries come back with what they cover)."""
    async with App(settings_from()) as app:
        published = await _publisher(app).restore(memory, backup_id, wait=True, timeout=timeout)
    _report("restore", [published.outcome], as_json)


async def erase(memory: MemoryRef, seq: int, timeout: float, as_json: bool) -> None:
    async with App(settings_from()) as app:
        published = await _publisher(app).erase(memory, seq, wait=True, timeout=timeout)
    outcome = published.outcome
    _report("erase", [outcome], as_json)
    if outcome is not None and outcome.ok and not as_json:
        click.echo(f"{memory.memory_id}: {outcome.detail}")


async def memory_stats(reader: MemoryReader, memory: MemoryRef, counter: Any) -> dict[str, Any]:
    """Counts, tokens and the role distribution, read page by page (never the whole
    memory at once), all of one generation (started over if the memory is cleared or
    replaced meanwhile)."""
    for _ in range(STATS_RETRIES):
        try:
            return await _stats_once(reader, memory, counter)
        except GenerationChangedError:
            continue
    return await _stats_once(reader, memory, counter)


async def _stats_once(reader: MemoryReader, memory: MemoryRef, counter: Any) -> dict[str, Any]:
    first = await reader.read(memory, last=1)
    roles: Counter[str] = Counter()
    role_tokens: Counter[str] = Counter()
    after, pages, uncounted = 0, 0, 0
    while first.exists:
        page = await reader.read(memory, after=after, limit=STATS_PAGE, generation=first.generation)
        pages += 1
        for m, c in zip(page.messages, page.token_counts, strict=True):
            role = "summary" if m.is_summary else m.role.value
            roles[role] += 1
            if c is None:
                uncounted += 1
            role_tokens[role] += c if c is not None else counter.message(m)
        if len(page.messages) < STATS_PAGE or page.next_after is None:
            break
        after = page.next_after
    return {
        "memory": memory.memory_id,
        "exists": first.exists,
        "generation": first.generation,
        "messages": first.count,
        "tokens": first.tokens,
        "uncounted": uncounted,
        "pages": pages,
        "roles": {r: {"messages": roles[r], "tokens": role_tokens[r]} for r in sorted(roles)},
    }


async def stats(memory: MemoryRef, as_json: bool) -> None:
    async with App(settings_from()) as app:
        resource = app.registry().get_resource(memory.resource)
        counter = Tokenizers().for_resource(resource)
        data = await memory_stats(app.reader(), memory, counter)
    limit = resource.token_limit
    data["budget_use"] = round(data["tokens"] / limit, 4) if limit else None
    if as_json:
        click.echo(json.dumps(data))
        return
    if not data["exists"]:
        click.echo(f"{memory.memory_id}: no such memory")
        return
    click.echo(
        f"{memory.memory_id}: generation {data['generation']}, {data['messages']} message(s), "
        f"{data['tokens']} tokens" + (f" ({data['budget_use']:.0%} of {limit})" if limit else "")
    )
    for role, v in data["roles"].items():
        click.echo(f"  {role}: {v['messages']} message(s), {v['tokens']} tokens")


def register(
    main: click.Group,
    ref_of: Callable[[str, bool], MemoryRef],
    stored_key: Callable[[Callable[..., None]], Callable[..., None]],
) -> None:
    """Add the commands to ``main``."""
    timeout = click.option("--timeout", type=float, default=10.0, show_default=True)
    as_json = click.option("--json", "as_json_out", is_flag=True, help="print JSON")
    messages_file = click.option(
        "--file", "path", required=True, help="a JSON array of messages ('-': standard input)"
    )

    @main.command("write")
    @click.argument("ref")
    @messages_file
    @timeout
    @as_json
    @stored_key
    @command
    async def write_cmd(
        ref: str, path: str, timeout: float, as_json_out: bool, stored_key: bool
    ) -> None:
        """Replace the whole memory REF with the messages of --file, atomically."""
        await write(ref_of(ref, stored_key), path, timeout, as_json_out)

    @main.command("append")
    @click.argument("ref")
    @messages_file
    @timeout
    @as_json
    @stored_key
    @command
    async def append_cmd(
        ref: str, path: str, timeout: float, as_json_out: bool, stored_key: bool
    ) -> None:
        """Append the messages of --file to REF, in order, in one round trip."""
        await append(ref_of(ref, stored_key), path, timeout, as_json_out)

    @main.command("delete")
    @click.argument("ref")
    @timeout
    @as_json
    @stored_key
    @command
    async def delete_cmd(ref: str, timeout: float, as_json_out: bool, stored_key: bool) -> None:
        """Delete the memory REF (a tombstone keeps late events from bringing it back)."""
        await delete(ref_of(ref, stored_key), timeout, as_json_out)

    @main.command("clear")
    @click.argument("ref")
    @click.option("--yes", is_flag=True, help="really remove every message")
    @click.option("--backup", is_flag=True, help="keep the messages as a backup first")
    @timeout
    @as_json
    @stored_key
    @command
    async def clear_cmd(
        ref: str, yes: bool, backup: bool, timeout: float, as_json_out: bool, stored_key: bool
    ) -> None:
        """Remove every message of REF (a new generation); needs --yes. With --backup,
        `memstream restore` brings them back."""
        if not yes:
            raise click.UsageError(f"clear removes every message of {ref}: pass --yes")
        await clear(ref_of(ref, stored_key), backup, timeout, as_json_out)

    @main.command("restore")
    @click.argument("ref")
    @click.argument("backup_id")
    @timeout
    @as_json
    @stored_key
    @command
    async def restore_cmd(
        ref: str, backup_id: str, timeout: float, as_json_out: bool, stored_key: bool
    ) -> None:
        """Replace REF with the messages of a backup that `clear --backup` made (its
        latest: an older one is refused)."""
        if not re.fullmatch(STREAM_ID_PATTERN, backup_id):
            raise click.BadParameter(
                f"{backup_id!r} is not a backup id: `clear --backup` prints it (a stream entry "
                f"id such as 1700000000000-0)",
                param_hint="BACKUP_ID",
            )
        await restore(ref_of(ref, stored_key), backup_id, timeout, as_json_out)

    @main.command("erase")
    @click.argument("ref")
    @click.argument("seq", type=click.IntRange(min=1))
    @timeout
    @as_json
    @stored_key
    @command
    async def erase_cmd(
        ref: str, seq: int, timeout: float, as_json_out: bool, stored_key: bool
    ) -> None:
        """Erase the message SEQ of REF for good, and any summary that covers it."""
        await erase(ref_of(ref, stored_key), seq, timeout, as_json_out)

    @main.command("stats")
    @click.argument("ref")
    @as_json
    @stored_key
    @command
    async def stats_cmd(ref: str, as_json_out: bool, stored_key: bool) -> None:
        """Counts, tokens, budget use and role distribution of REF, read page by page."""
        await stats(ref_of(ref, stored_key), as_json_out)
