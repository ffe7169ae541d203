"""``DistributedLock``: a named lock in Redis with a fencing counter.

Acquire is ``SET NX PX`` (in a script that also increments the lock's fencing
counter, so every holder gets a larger fence than the one before); release is
compare-and-delete and refresh compare-and-extend, both on the holder's whole value
(``<fence>:<owner>:<random>``). ``hold`` refreshes the lock in the background every
third of its TTL while the work runs, and tells the holder at the first refresh that
fails: the work is cancelled and ``LockLostError`` raised in its place.

A lock saves duplicate work; it cannot make writes safe on its own (a holder may be
paused past its TTL). Writes that must not come from a stale holder check the fence
(``Held.fence``) or, as memstream's summarizer does, are applied by a script that
checks the state they were planned on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from store.errors import StoreError
from store.keys import Keys
from store.scripts import Scripts

log = logging.getLogger(__name__)

#: A lock's fencing counter outlives its last acquisition by this long (7 days): fences
#: increase for as long as a lock is in use, and a lock on a name that goes away (a
#: deleted memory) leaves nothing behind for good.
FENCE_TTL_MS = 7 * 86400 * 1000


class LockNotAcquiredError(StoreError):
    """Another owner holds the lock (and ``wait`` ran out)."""

    def __init__(self, name: str, holder: str | None = None) -> None:
        super().__init__(f"lock {name!r} is held" + (f" by {holder}" if holder else ""))
        self.name = name


class LockLostError(StoreError):
    """The lock expired or was taken while held: the work under it was stopped."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"lock {name!r} was lost while held (a refresh failed); its work was stopped"
        )
        self.name = name


@dataclass(slots=True)
class Held:
    """A held lock."""

    name: str
    value: str
    ttl: float
    lost: bool = False
    acquired_at: float = field(default_factory=time.monotonic)

    @property
    def fence(self) -> int:
        return int(self.value.split(":", 1)[0])


class DistributedLock:
    """Named locks under one namespace (``<ns>:lock:{<name>}``)."""

    def __init__(self, scripts: Scripts, keys: Keys, owner: str | None = None) -> None:
        self._scripts = scripts
        self._keys = keys
        self.owner = owner or secrets.token_hex(4)

    async def acquire(self, name: str, ttl: float, *, wait: float = 0.0) -> Held | None:
        """The lock for ``ttl`` seconds, or None if still held by another after ``wait``
        seconds of polling."""
        ttl_ms = _ms(ttl)
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            nonce = secrets.token_hex(8)
            reply = await self._scripts(
                "acquire_lock",
                [self._keys.lock(name), self._keys.lock_fence(name)],
                [self.owner, nonce, ttl_ms, FENCE_TTL_MS],
            )
            if int(reply[0]) == 1:
                return Held(name, str(reply[1]), ttl)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    async def extend(self, held: Held, ttl: float | None = None) -> bool:
        """Compare-and-extend; False when the lock is no longer ``held``'s."""
        reply = await self._scripts(
            "refresh_lease", [self._keys.lock(held.name)], [held.value, _ms(ttl or held.ttl)]
        )
        return int(reply) == 1

    async def release(self, held: Held) -> bool:
        """Compare-and-delete; False when the lock was no longer ``held``'s."""
        return (
            int(await self._scripts("release_lock", [self._keys.lock(held.name)], [held.value]))
            == 1
        )

    @contextlib.asynccontextmanager
    async def hold(self, name: str, ttl: float, *, wait: float = 0.0) -> AsyncIterator[Held]:
        """Hold the lock while the block runs, refreshing it every ``ttl / 3``. Raises
        LockNotAcquiredError if it cannot be had, and LockLostError (the block being
        cancelled at its next await) at the first refresh that fails."""
        held = await self.acquire(name, ttl, wait=wait)
        if held is None:
            raise LockNotAcquiredError(name)
        task = asyncio.current_task()
        assert task is not None
        base = task.cancelling()
        body = {"running": True, "cancelled": False}

        async def refresh() -> None:
            while True:
                await asyncio.sleep(held.ttl / 3)
                try:
                    ok = await self.extend(held)
                except Exception as e:  # an unreachable Redis counts as lost
                    log.warning("lock %r: refresh failed: %r", name, e)
                    ok = False
                    # A refresh that cannot reach Redis may still succeed on the next
                    # try while the TTL lasts.
                    if time.monotonic() - held.acquired_at < held.ttl * 2 / 3:
                        continue
                if not ok:
                    held.lost = True
                    if body["running"]:
                        body["cancelled"] = True
                        task.cancel()
                    return
                held.acquired_at = time.monotonic()

        refresher = asyncio.create_task(refresh())
        lost = False
        try:
            yield held
        except asyncio.CancelledError:
            if body["cancelled"]:
                body["cancelled"] = False
                # Ours alone: no other cancellation (a shutdown, say) came with it.
                if task.uncancel() <= base:
                    raise LockLostError(name) from None
            raise
        finally:
            body["running"] = False
            if body["cancelled"]:  # swallowed by the block, or answered with another error
                body["cancelled"] = False
                lost = True
                task.uncancel()
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            if not held.lost:
                with contextlib.suppress(Exception):
                    await self.release(held)
        if lost:
            raise LockLostError(name)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
