"""Rendezvous assignment: every partition has exactly one owner among the live workers,
and a worker joining or leaving moves only its own share."""

from __future__ import annotations

from collections import Counter

import pytest

from processors.assignment import assigned, owner, weight

PARTITIONS = 64
THREE = ["host-a-101-aaaaaa", "host-b-202-bbbbbb", "host-c-303-cccccc"]
FOURTH = "host-d-404-dddddd"


def owners(members: list[str], partitions: int = PARTITIONS) -> dict[int, str]:
    result = {}
    for p in range(partitions):
        o = owner(p, members)
        assert o is not None
        result[p] = o
    return result


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_every_partition_has_exactly_one_owner(count: int) -> None:
    members = [f"worker-{i}" for i in range(count)]
    shares = [assigned(w, members, PARTITIONS) for w in members]
    assert sum(len(s) for s in shares) == PARTITIONS
    assert set().union(*shares) == set(range(PARTITIONS))
    for i, a in enumerate(shares):
        for b in shares[i + 1 :]:
            assert not a & b


def test_every_worker_computes_the_same_owners_whatever_the_member_order() -> None:
    reversed_members = list(reversed(THREE))
    for w in THREE:
        assert assigned(w, THREE, PARTITIONS) == assigned(w, reversed_members, PARTITIONS)
        assert assigned(w, THREE, PARTITIONS) == {p for p, o in owners(THREE).items() if o == w}


def test_a_worker_counts_itself_as_a_member() -> None:
    assert assigned("solo", [], 8) == set(range(8))
    assert assigned(THREE[0], THREE[1:], PARTITIONS) == assigned(THREE[0], THREE, PARTITIONS)


def test_no_members_means_no_owner() -> None:
    assert owner(0, []) is None


def test_adding_a_fourth_worker_moves_only_partitions_to_it_about_a_quarter() -> None:
    before = owners(THREE)
    after = owners([*THREE, FOURTH])
    moved = {p for p in range(PARTITIONS) if before[p] != after[p]}
    assert all(after[p] == FOURTH for p in moved)
    assert moved == {p for p, o in after.items() if o == FOURTH}
    assert PARTITIONS // 8 <= len(moved) <= PARTITIONS * 3 // 8  # about 16 of 64


def test_removing_a_worker_moves_only_its_partitions() -> None:
    members = [*THREE, FOURTH]
    before = owners(members)
    gone = THREE[1]
    after = owners([m for m in members if m != gone])
    moved = {p for p in range(PARTITIONS) if before[p] != after[p]}
    assert moved == {p for p, o in before.items() if o == gone}
    assert gone not in after.values()


def test_three_workers_share_64_partitions_reasonably_evenly() -> None:
    counts = Counter(owners(THREE).values())
    assert set(counts) == set(THREE)
    assert min(counts.values()) >= 12
    assert max(counts.values()) <= 32


def test_balance_holds_for_many_worker_names() -> None:
    """Over many sets of 3 worker ids, nobody gets less than a third of a fair share."""
    for n in range(50):
        members = [f"vm-{n}-{i}-{n * 7919 + i:06x}" for i in range(3)]
        counts = Counter(owners(members).values())
        assert len(counts) == 3
        assert min(counts.values()) >= 8, (members, counts)


def test_weights_are_stable_and_depend_on_worker_and_partition() -> None:
    assert weight("w", 1) == weight("w", 1)
    assert weight("w", 1) != weight("w", 2)
    assert weight("w", 1) != weight("v", 1)
    assert 0 <= weight("w", 1) < 2**64
