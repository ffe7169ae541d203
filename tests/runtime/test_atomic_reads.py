"""A replace (``memstream write``) is atomic for readers: every read sees the old memory
or the new one, whole, never a mix; paginated readers are told when the memory changed
under them instead of getting pages of two versions."""

from __future__ import annotations

import asyncio

from memory import MemoryRef
from store import GenerationChangedError, MemoryReader
from tests.runtime.conftest import Rig, user

SIZE = 40
VERSIONS = 25


def version_of(contents: list[str]) -> set[str]:
    return {c.split(":", 1)[0] for c in contents}


async def test_readers_see_the_old_or_the_new_memory_never_a_mix(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/atomic-write")
    rig.start("appender")
    await rig.publisher.replace(ref, [user(f"v0:{i}") for i in range(SIZE)], wait=True)
    done = asyncio.Event()
    seen: dict[str, set[str]] = {"all": set(), "last": set(), "pages": set()}
    restarts = 0

    async def writer() -> None:
        for v in range(1, VERSIONS + 1):
            messages = [user(f"v{v}:{i}") for i in range(SIZE)]
            published = await rig.publisher.replace(ref, messages, wait=True)
            assert published.outcome is not None and published.outcome.ok
        done.set()

    async def whole(reader: MemoryReader) -> None:
        while not done.is_set():
            view = await reader.read(ref)
            contents = [str(m.content) for m in view.messages]
            assert len(contents) == SIZE, contents
            versions = version_of(contents)
            assert len(versions) == 1, contents
            assert contents == [f"{next(iter(versions))}:{i}" for i in range(SIZE)]
            seen["all"] |= versions
            tail = [str(m.content) for m in (await reader.read(ref, last=7)).messages]
            assert len(tail) == 7 and len(version_of(tail)) == 1, tail
            seen["last"] |= version_of(tail)

    async def paged(reader: MemoryReader) -> None:
        nonlocal restarts
        while not done.is_set():
            first = await reader.read(ref, after=0, limit=6)
            contents = [str(m.content) for m in first.messages]
            after = first.next_after
            try:
                while after is not None:
                    page = await reader.read(ref, after=after, limit=6, generation=first.generation)
                    contents += [str(m.content) for m in page.messages]
                    after = page.next_after
            except GenerationChangedError as e:
                assert e.expected == first.generation and e.found > first.generation
                restarts += 1
                continue
            assert len(contents) == SIZE and len(version_of(contents)) == 1, contents
            seen["pages"] |= version_of(contents)

    readers = [MemoryReader(rig.client, rig.scripts, rig.keys) for _ in range(3)]
    await asyncio.wait_for(
        asyncio.gather(writer(), whole(readers[0]), whole(readers[1]), paged(readers[2])),
        timeout=60,
    )
    # The readers really raced the writer: they saw several versions.
    assert len(seen["all"]) >= 3 and len(seen["last"]) >= 3, seen
    assert len(seen["pages"]) + restarts >= 3, (seen, restarts)
