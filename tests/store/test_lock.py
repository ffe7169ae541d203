"""DistributedLock (store/lock.py): acquire, extend and release with fencing over
acquire_lease.lua, refresh_lease.lua and release_lock.lua, and ``hold`` with its
background refresh and LockLostError, against real Redis 6.2, 7.x and a Cluster."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import pytest

from store import Keys, RedisClient, Scripts
from store.lock import FENCE_TTL_MS, DistributedLock, Held, LockLostError, LockNotAcquiredError

NAME = "flush:acme/customer-support/k1"
TTL = 10.0


@pytest.fixture
def lock(scripts: Scripts, keys: Keys) -> DistributedLock:
    return DistributedLock(scripts, keys, "owner-a")


@pytest.fixture
def other(scripts: Scripts, keys: Keys) -> DistributedLock:
    return DistributedLock(scripts, keys, "owner-b")


async def expire_now(client: RedisClient, key: str, timeout: float = 5.0) -> None:
    """Expire a key at once and wait (with a deadline) until Redis reports it gone."""
    await client.pexpire(key, 1)
    deadline = time.monotonic() + timeout
    while await client.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire within {timeout}s"
        await asyncio.sleep(0.005)


async def acquired(
    lock: DistributedLock, name: str = NAME, ttl: float = TTL, wait: float = 0.0
) -> Held:
    held = await lock.acquire(name, ttl, wait=wait)
    assert held is not None, f"{lock.owner} could not acquire {name!r}"
    return held


async def outcome(coro: Awaitable[object]) -> tuple[BaseException | None, int]:
    """Run ``coro`` in a task of its own: what it raised (None when it returned) and its
    task's ``cancelling()`` count right after, as the task itself sees it."""

    async def run() -> tuple[BaseException | None, int]:
        task = asyncio.current_task()
        assert task is not None
        try:
            await coro
        except Exception as e:
            return e, task.cancelling()
        return None, task.cancelling()

    return await asyncio.wait_for(asyncio.create_task(run()), 60)


# -- acquire -----------------------------------------------------------------------------


async def test_acquire_returns_a_held_lock_with_a_fence(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    held = await acquired(lock)
    assert re.fullmatch(r"1:owner-a:[0-9a-f]{16}", held.value)
    assert held.fence == 1
    assert held.name == NAME and held.ttl == TTL and not held.lost
    assert await client.get(keys.lock(NAME)) == held.value
    assert 0 < await client.pttl(keys.lock(NAME)) <= TTL * 1000
    assert await client.get(keys.lock_fence(NAME)) == "1"
    # The fence outlives the lock by days (a lock on a name that goes away leaves nothing
    # behind for good).
    assert await client.pttl(keys.lock_fence(NAME)) > FENCE_TTL_MS - 60_000


async def test_a_second_owner_cannot_acquire_while_held_and_gets_it_after_release(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    first = await acquired(lock)
    assert await other.acquire(NAME, TTL) is None
    assert await lock.acquire(NAME, TTL) is None, "not re-entrant either"
    assert await client.get(keys.lock(NAME)) == first.value
    # A refused acquisition is not an acquisition: the fence does not move.
    assert await client.get(keys.lock_fence(NAME)) == "1"
    assert await lock.release(first)
    assert not await client.exists(keys.lock(NAME))
    second = await acquired(other)
    assert second.fence == 2
    assert second.value.startswith("2:owner-b:")
    assert await client.get(keys.lock(NAME)) == second.value


async def test_locks_of_different_names_are_independent(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    a = await acquired(lock, "job-a")
    b = await acquired(other, "job-b")
    assert a.fence == b.fence == 1, "each name has its own fencing counter"
    assert await client.get(keys.lock("job-a")) == a.value
    assert await client.get(keys.lock("job-b")) == b.value


async def test_fences_strictly_increase_across_acquisitions(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    fences = []
    for owner in (lock, other, lock, other):
        held = await acquired(owner)
        fences.append(held.fence)
        assert await owner.release(held)
    # ... and across an expiry (a holder that never released), too.
    held = await acquired(lock)
    fences.append(held.fence)
    await expire_now(client, keys.lock(NAME))
    fences.append((await acquired(other)).fence)
    assert fences == [1, 2, 3, 4, 5, 6]


# -- release -------------------------------------------------------------------------------


async def test_release_is_compare_and_delete(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    stale = await acquired(lock)
    await expire_now(client, keys.lock(NAME))
    current = await acquired(other)
    assert not await lock.release(stale), "a stale holder cannot release"
    assert await client.get(keys.lock(NAME)) == current.value, "the other's lock stays"
    assert await other.release(current)
    assert not await client.exists(keys.lock(NAME))
    assert not await other.release(current), "a second release finds nothing"


async def test_release_of_an_expired_lock_returns_false(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    held = await acquired(lock)
    await expire_now(client, keys.lock(NAME))
    assert not await lock.release(held)
    assert not await client.exists(keys.lock(NAME))


# -- extend --------------------------------------------------------------------------------


async def test_extend_is_compare_and_extend(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    held = await acquired(lock)
    await client.pexpire(keys.lock(NAME), 2000)
    assert await lock.extend(held)
    assert 2000 < await client.pttl(keys.lock(NAME)) <= TTL * 1000
    assert await lock.extend(held, ttl=30.0)
    assert TTL * 1000 < await client.pttl(keys.lock(NAME)) <= 30_000
    assert await client.get(keys.lock(NAME)) == held.value

    # A stale holder: its lock expired and another owner took it.
    await expire_now(client, keys.lock(NAME))
    current = await acquired(other, ttl=5.0)
    assert not await lock.extend(held, ttl=60.0)
    assert await client.get(keys.lock(NAME)) == current.value
    assert 0 < await client.pttl(keys.lock(NAME)) <= 5000, "the other's TTL is untouched"


async def test_extend_of_an_expired_lock_does_not_bring_it_back(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    held = await acquired(lock)
    await expire_now(client, keys.lock(NAME))
    assert not await lock.extend(held)
    assert not await client.exists(keys.lock(NAME))


# -- acquire with wait ---------------------------------------------------------------------


async def test_acquire_with_wait_gets_the_lock_once_the_holder_releases(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    held = await acquired(lock)

    async def release_soon() -> None:
        await asyncio.sleep(0.3)
        assert await lock.release(held)

    releaser = asyncio.create_task(release_soon())
    waited = await acquired(other, wait=30.0)
    await releaser
    assert waited.fence == 2
    assert await client.get(keys.lock(NAME)) == waited.value


async def test_acquire_with_wait_gets_the_lock_once_it_expires(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    await acquired(lock, ttl=0.3)  # never released
    waited = await acquired(other, wait=30.0)
    assert waited.fence == 2
    assert await client.get(keys.lock(NAME)) == waited.value


async def test_acquire_with_wait_gives_up_when_the_wait_runs_out(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    held = await acquired(lock)
    started = time.monotonic()
    assert await other.acquire(NAME, TTL, wait=0.3) is None
    assert time.monotonic() - started < TTL, "it gave up long before the holder's TTL"
    assert await client.get(keys.lock(NAME)) == held.value
    assert await client.get(keys.lock_fence(NAME)) == "1"


# -- hold ------------------------------------------------------------------------------------


async def test_hold_lets_one_owner_at_a_time_into_the_critical_section(
    scripts: Scripts, keys: Keys, client: RedisClient
) -> None:
    owners = [DistributedLock(scripts, keys, f"w{i}") for i in range(8)]
    rounds = 3
    state = {"inside": 0, "most_inside": 0, "counter": 0}
    fences: list[int] = []

    async def work(owner: DistributedLock) -> None:
        for _ in range(rounds):
            async with owner.hold(NAME, ttl=5.0, wait=60.0) as held:
                state["inside"] += 1
                state["most_inside"] = max(state["most_inside"], state["inside"])
                fences.append(held.fence)
                value = state["counter"]
                await asyncio.sleep(0.01)  # a lost update here if two were inside
                state["counter"] = value + 1
                state["inside"] -= 1

    await asyncio.wait_for(asyncio.gather(*(work(o) for o in owners)), 90)
    assert state["most_inside"] == 1
    assert state["counter"] == len(owners) * rounds, "every owner ran every round"
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    assert not await client.exists(keys.lock(NAME)), "the last holder released"


async def test_hold_refreshes_the_lock_while_the_body_runs(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    ttl = 0.75  # refreshed every 0.25 s; the body runs more than 3 x ttl
    refused = 0
    async with lock.hold(NAME, ttl) as held:
        deadline = time.monotonic() + 3.5 * ttl
        while time.monotonic() < deadline:
            assert await other.acquire(NAME, ttl) is None, "another owner got in"
            refused += 1
            assert await client.get(keys.lock(NAME)) == held.value
            await asyncio.sleep(0.1)
        assert not held.lost
        assert 0 < await client.pttl(keys.lock(NAME)) <= ttl * 1000
    assert refused > 0
    assert not held.lost
    assert not await client.exists(keys.lock(NAME)), "released at the end"
    assert await client.get(keys.lock_fence(NAME)) == "1", "one acquisition all along"
    assert (await acquired(other)).fence == 2


async def test_hold_releases_the_lock_when_the_body_raises(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    with pytest.raises(ValueError, match="boom"):
        async with lock.hold(NAME, TTL):
            assert await client.exists(keys.lock(NAME))
            raise ValueError("boom")
    assert not await client.exists(keys.lock(NAME))


async def test_hold_releases_the_lock_when_the_holder_is_cancelled(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    inside = asyncio.Event()

    async def body() -> None:
        async with lock.hold(NAME, TTL):
            inside.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(body())
    await asyncio.wait_for(inside.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await client.exists(keys.lock(NAME))


async def test_hold_raises_lock_not_acquired_when_held_by_another(
    lock: DistributedLock, other: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    held = await acquired(lock)
    ran = False
    for wait in (0.0, 0.3):
        with pytest.raises(LockNotAcquiredError) as caught:
            async with other.hold(NAME, TTL, wait=wait):
                ran = True
        assert caught.value.name == NAME
    assert not ran, "the body never runs without the lock"
    assert await client.get(keys.lock(NAME)) == held.value, "the holder's lock stays"
    assert await client.get(keys.lock_fence(NAME)) == "1"


async def _overwrite(client: RedisClient, keys: Keys, other: DistributedLock) -> str | None:
    await client.set(keys.lock(NAME), "other")
    return "other"


async def _delete(client: RedisClient, keys: Keys, other: DistributedLock) -> str | None:
    await client.delete(keys.lock(NAME))
    return None


async def _expire(client: RedisClient, keys: Keys, other: DistributedLock) -> str | None:
    await expire_now(client, keys.lock(NAME))
    return None


async def _take(client: RedisClient, keys: Keys, other: DistributedLock) -> str | None:
    await expire_now(client, keys.lock(NAME))
    return (await acquired(other, ttl=30.0)).value


Intrusion = Callable[[RedisClient, Keys, DistributedLock], Awaitable[str | None]]


@pytest.mark.parametrize(
    "intrude",
    [
        pytest.param(_overwrite, id="overwritten"),
        pytest.param(_delete, id="deleted"),
        pytest.param(_expire, id="expired"),
        pytest.param(_take, id="taken-by-another"),
    ],
)
async def test_hold_tells_the_holder_at_the_first_failed_refresh(
    lock: DistributedLock,
    other: DistributedLock,
    client: RedisClient,
    keys: Keys,
    intrude: Intrusion,
) -> None:
    ttl = 0.6  # the first refresh comes ttl / 3 after the acquisition
    seen: dict[str, object] = {"cancelled": False, "completed": False}
    after: list[str | None] = []

    async def body() -> None:
        async with lock.hold(NAME, ttl) as held:
            seen["held"] = held
            after.append(await intrude(client, keys, other))
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise
            seen["completed"] = True

    error, cancelling = await outcome(body())
    assert isinstance(error, LockLostError), f"expected LockLostError, got {error!r}"
    assert error.name == NAME
    assert seen["cancelled"] and not seen["completed"], "the body was cancelled"
    assert cancelling == 0, "the task is not left cancelling"
    held = seen["held"]
    assert isinstance(held, Held) and held.lost
    # The lock was not "released" from under whoever has it now.
    assert await client.get(keys.lock(NAME)) == after[0]


async def test_the_task_goes_on_normally_after_a_lost_lock(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    async def body() -> str:
        try:
            async with lock.hold(NAME, 0.6):
                await client.set(keys.lock(NAME), "other")
                await asyncio.sleep(30)
        except LockLostError:
            pass
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        # No cancellation is pending: the task can await (and sleep) as usual.
        await asyncio.sleep(0.05)
        return str(await client.get(keys.lock(NAME)))

    assert await asyncio.wait_for(body(), 60) == "other"


async def test_a_body_that_swallows_the_cancellation_still_gets_lock_lost(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    swallowed = asyncio.Event()

    async def body() -> None:
        async with lock.hold(NAME, 0.6):
            await client.set(keys.lock(NAME), "other")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                swallowed.set()  # and returns normally

    error, cancelling = await outcome(body())
    assert swallowed.is_set()
    assert isinstance(error, LockLostError), f"expected LockLostError, got {error!r}"
    assert cancelling == 0
    assert await client.get(keys.lock(NAME)) == "other"


async def test_a_refresh_that_cannot_reach_redis_once_is_retried(
    lock: DistributedLock,
    other: DistributedLock,
    client: RedisClient,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_extend = lock.extend
    calls = {"n": 0}

    async def flaky_extend(held: Held, ttl: float | None = None) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("Redis is unreachable (once)")
        return await real_extend(held, ttl)

    monkeypatch.setattr(lock, "extend", flaky_extend)
    ttl = 1.2  # the first refresh (at ttl / 3) fails, the next one (at 2 ttl / 3) works
    async with lock.hold(NAME, ttl) as held:
        deadline = time.monotonic() + 2 * ttl
        while time.monotonic() < deadline:
            assert await other.acquire(NAME, ttl) is None
            await asyncio.sleep(0.1)
    assert calls["n"] >= 3, "refreshed again after the failure"
    assert not held.lost
    assert not await client.exists(keys.lock(NAME))


async def test_a_refresh_that_never_reaches_redis_loses_the_lock(
    lock: DistributedLock,
    client: RedisClient,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def down(held: Held, ttl: float | None = None) -> bool:
        raise ConnectionError("Redis is unreachable")

    monkeypatch.setattr(lock, "extend", down)
    seen: dict[str, Held] = {}

    async def body() -> None:
        async with lock.hold(NAME, 0.6) as held:
            seen["held"] = held
            await asyncio.sleep(30)

    error, cancelling = await outcome(body())
    assert isinstance(error, LockLostError), f"expected LockLostError, got {error!r}"
    assert cancelling == 0
    assert seen["held"].lost


# -- cancellation edge cases ---------------------------------------------------------------


async def test_a_body_that_turns_the_cancellation_into_an_error_leaves_no_cancel_behind(
    lock: DistributedLock, client: RedisClient, keys: Keys
) -> None:
    async def body() -> None:
        async with lock.hold(NAME, 0.6):
            await client.set(keys.lock(NAME), "other")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise RuntimeError("the work was interrupted") from None

    error, cancelling = await outcome(body())
    assert isinstance(error, LockLostError | RuntimeError), repr(error)
    assert cancelling == 0, "the lock's own cancellation must be undone"


async def test_an_outside_cancellation_arriving_with_a_lost_lock_is_not_swallowed(
    lock: DistributedLock, client: RedisClient, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_extend = lock.extend
    holder: list[asyncio.Task[None]] = []

    async def extend_then_cancel(held: Held, ttl: float | None = None) -> bool:
        ok = await real_extend(held, ttl)
        # The holder's owner cancels it in the same loop iteration as the failed refresh
        # (a shutdown, say): scheduled before the holder wakes up.
        asyncio.get_running_loop().call_soon(holder[0].cancel)
        return ok

    monkeypatch.setattr(lock, "extend", extend_then_cancel)
    inside = asyncio.Event()

    async def body() -> None:
        async with lock.hold(NAME, 0.6):
            await client.set(keys.lock(NAME), "other")
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    holder.append(task)
    await asyncio.wait([task], timeout=60)
    assert inside.is_set() and task.done()
    if not task.cancelled():
        error = task.exception()
        assert error is None, f"the outside cancellation was swallowed: {error!r}"
