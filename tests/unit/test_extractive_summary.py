"""The extractive summary (``memory.summary``): a system message headed by how many
messages it stands for, made of the most informative sentences (names, numbers,
decisions over filler) in their original order, each with who said it; within its token
budget as counted by the memory's real tiktoken counter, for any budget from the
smallest useful one up; the same for the same input, whatever the hash seed; and
folding an earlier summary's lines in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import MemoryResource, Role, StoredMessage
from memory.flush import MIN_SUMMARY_TOKENS
from memory.message import Message
from memory.summary import HEADER, extractive_summary
from processors.tokenizers import Tokenizers

ROOT = Path(__file__).resolve().parents[2]
RESOURCE = MemoryResource.model_validate({"resource": "memory", "id": "t", "max_tokens": 1000})
COUNTER = Tokenizers().for_resource(RESOURCE)
PROPERTY = settings(max_examples=200, deadline=None, database=None, derandomize=True)


def message(seq: int, role: Role, content: str, **fields: object) -> StoredMessage:
    return StoredMessage.model_validate(
        {"seq": seq, "gen": 1, "at": 1000 * seq, "entry": "1-0", "role": role}
        | {"content": content}
        | fields
    )


def lines(summary: Message) -> list[str]:
    assert isinstance(summary.content, str)
    return summary.content.split("\n")


def tokens(summary: Message) -> int:
    return COUNTER.message(summary)


U, A = Role.USER, Role.ASSISTANT

CONVERSATION = [
    message(1, U, "Hello there!"),
    message(2, A, "Hi! How can I help?"),
    message(3, U, "The order id is 48213."),
    message(4, A, "Ok."),
    message(5, U, "The account belongs to Alice Moreno."),
    message(6, A, "Sure, one moment."),
    message(7, A, "We agreed to refund the shipping fee."),
    message(8, U, "Thanks a lot!"),
    message(9, A, "You are welcome, have a nice day."),
]
INFORMATIVE = [
    "- user: The order id is 48213.",
    "- user: The account belongs to Alice Moreno.",
    "- assistant: We agreed to refund the shipping fee.",
]


# --- shape ------------------------------------------------------------------------------


def test_a_roomy_budget_keeps_every_sentence_with_its_speaker_in_order() -> None:
    conversation = [
        message(1, U, "I need a new charger. Mine broke yesterday!", name="ann"),
        message(
            2,
            A,
            "Let me look.",
            tool_calls=[
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "find_order", "arguments": '{"id": 7}'},
                }
            ],
        ),
        message(3, Role.TOOL, "order 7: charger, shipped\nETA Friday", tool_call_id="c1"),
        StoredMessage.model_validate(
            {
                "seq": 4,
                "gen": 1,
                "at": 4000,
                "entry": "1-0",
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                    {"type": "text", "text": "This is the broken one."},
                ],
            }
        ),
    ]
    summary = extractive_summary(conversation, 1000, COUNTER)
    assert summary.role is Role.SYSTEM
    assert summary.content == "\n".join(
        [
            "Summary of 4 earlier messages:",
            "- user ann: I need a new charger.",
            "- user ann: Mine broke yesterday!",
            "- assistant: Let me look.",
            '- assistant: called find_order({"id": 7})',
            "- tool: order 7: charger, shipped",
            "- tool: ETA Friday",
            "- user: This is the broken one.",
        ]
    )


def test_the_header_counts_every_message_an_earlier_summary_covers() -> None:
    earlier = message(
        10,
        Role.SYSTEM,
        "Summary of 4 earlier messages:\n- user: Alice ordered 3 lamps.",
        covers=[1, 2, 5, 9],
    )
    conversation = [earlier, message(11, U, "Any news?"), message(12, A, "Not yet.")]
    for budget in (MIN_SUMMARY_TOKENS, 1000):
        assert lines(extractive_summary(conversation, budget, COUNTER))[0] == (
            "Summary of 6 earlier messages:"
        )


# --- what it keeps -----------------------------------------------------------------------


def test_names_numbers_and_decisions_are_kept_over_filler() -> None:
    budget = tokens(
        Message(role=Role.SYSTEM, content="\n".join([HEADER.format(n=9), *INFORMATIVE]))
    )
    summary = extractive_summary(CONVERSATION, budget, COUNTER)
    assert lines(summary)[1:] == INFORMATIVE
    assert tokens(summary) <= budget


def test_a_tighter_budget_drops_the_least_informative_of_them_first() -> None:
    budget = tokens(
        Message(role=Role.SYSTEM, content="\n".join([HEADER.format(n=9), *INFORMATIVE]))
    )
    kept = lines(extractive_summary(CONVERSATION, budget - 2, COUNTER))[1:]
    assert INFORMATIVE[0] in kept  # an order id: a number and a decision word
    assert INFORMATIVE[2] in kept  # a decision
    assert INFORMATIVE[1] not in kept  # a name only


def test_chosen_sentences_keep_their_original_order_not_their_rank() -> None:
    conversation = [
        message(1, U, "Bob prefers email."),
        message(2, A, "Okay."),
        message(3, U, "Refund order 5512 by Friday, as agreed with Carol on May 2."),
    ]
    summary = extractive_summary(conversation, 1000, COUNTER)
    assert lines(summary)[1:] == [
        "- user: Bob prefers email.",
        "- assistant: Okay.",
        "- user: Refund order 5512 by Friday, as agreed with Carol on May 2.",
    ]
    first, _, last = lines(summary)[1:]
    budget = tokens(Message(role=Role.SYSTEM, content="\n".join([lines(summary)[0], first, last])))
    assert lines(extractive_summary(conversation, budget, COUNTER))[1:] == [first, last]


# --- earlier summaries ---------------------------------------------------------------------


def test_an_earlier_summary_is_folded_line_by_line_without_its_header() -> None:
    earlier = message(
        20,
        Role.SYSTEM,
        "Summary of 3 earlier messages:\n- user: Alice ordered 3 lamps.\n"
        "- assistant: Refund approved for order 77.\n- user: Ok.",
        covers=[1, 2, 3],
    )
    conversation = [earlier, message(21, U, "When does it arrive?")]
    summary = extractive_summary(conversation, 1000, COUNTER)
    body = lines(summary)[1:]
    assert len(body) == 4
    assert "Alice ordered 3 lamps." in body[0]
    assert "Refund approved for order 77." in body[1]
    assert body[3] == "- user: When does it arrive?"
    assert not any("Summary of" in line for line in body)


def test_an_earlier_summarys_lines_compete_with_the_new_sentences() -> None:
    earlier = message(
        20,
        Role.SYSTEM,
        "Summary of 2 earlier messages:\n- user: Hello!\n- assistant: Refund of 40 euros agreed.",
        covers=[1, 2],
    )
    conversation = [earlier, message(21, U, "Ok thanks."), message(22, U, "Ship to Lyon.")]
    full = lines(extractive_summary(conversation, 1000, COUNTER))
    keep = [full[0], full[2], full[4]]  # the refund and the city
    budget = tokens(Message(role=Role.SYSTEM, content="\n".join(keep)))
    assert lines(extractive_summary(conversation, budget, COUNTER)) == keep


def test_folding_a_summary_again_does_not_stack_speaker_prefixes() -> None:
    summary = extractive_summary([message(1, U, "Alice ordered 3 lamps.")], 1000, COUNTER)
    covers = [1]
    for seq in (2, 3, 4):
        assert isinstance(summary.content, str)
        folded = message(seq * 10, Role.SYSTEM, summary.content, covers=covers)
        summary = extractive_summary([folded, message(seq, U, f"Note {seq}.")], 1000, COUNTER)
        covers = [*covers, seq]
    assert all(line.count("earlier:") <= 1 for line in lines(summary))


# --- budgets -------------------------------------------------------------------------------


DETERMINISM = """
import json, sys
from memory import MemoryResource, StoredMessage
from memory.summary import extractive_summary
from processors.tokenizers import Tokenizers
data = json.load(sys.stdin)
resource = MemoryResource.model_validate(data["resource"])
counter = Tokenizers().for_resource(resource)
messages = [StoredMessage.model_validate(m) for m in data["messages"]]
print(json.dumps([extractive_summary(messages, b, counter).content for b in data["budgets"]]))
"""


def test_the_same_input_gives_the_same_summary_whatever_the_hash_seed() -> None:
    budgets = [20, 30, 41, 48, 60, 1000]
    here = [extractive_summary(CONVERSATION, b, COUNTER).content for b in budgets]
    again = [extractive_summary(list(CONVERSATION), b, COUNTER).content for b in budgets]
    assert again == here
    data = {
        "resource": RESOURCE.model_dump(mode="json"),
        "messages": [m.model_dump(mode="json") for m in CONVERSATION],
        "budgets": budgets,
    }
    seed = "0" if os.environ.get("PYTHONHASHSEED") != "0" else "1"
    out = subprocess.run(
        [sys.executable, "-c", DETERMINISM],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": seed},
        input=json.dumps(data),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert json.loads(out) == here


def test_a_budget_too_small_for_any_sentence_keeps_the_leading_words_of_the_best() -> None:
    conversation = [
        message(
            1,
            U,
            "Please refund order 99812 for Dana Whitfield because the blender arrived "
            "cracked on Tuesday and she wants her money back.",
        ),
        message(2, A, "I understand that this must be frustrating and I am looking into it now."),
    ]
    budget = 24
    summary = extractive_summary(conversation, budget, COUNTER)
    assert tokens(summary) <= budget
    header, line = lines(summary)
    assert header == "Summary of 2 earlier messages:"
    assert line.startswith("- user: Please refund order 99812")
    assert line.endswith(" ...")
    original = "- user: " + str(conversation[0].content)
    assert original.startswith(line.removesuffix(" ..."))


def test_when_lines_cost_more_joined_than_apart_the_least_informative_goes() -> None:
    conversation = [message(1, U, "Ok."), message(2, U, "Order #5?;")]
    header = HEADER.format(n=2)
    both = ["- user: Ok.", "- user: Order #5?;"]
    apart = tokens(Message(role=Role.SYSTEM, content=header)) + sum(
        COUNTER.text(line + "\n") for line in both
    )
    joined = Message(role=Role.SYSTEM, content="\n".join([header, *both]))
    assert tokens(joined) > apart  # the premise: "?;" then a newline count one more
    summary = extractive_summary(conversation, apart, COUNTER)
    assert tokens(summary) <= apart
    assert lines(summary) == [header, "- user: Order #5?;"]


@pytest.mark.parametrize(
    ("filler", "informative"),
    [
        ("We met him there.", "We met Bob there."),  # a name
        ("The code is blue.", "The code is 4471."),  # a number
        ("We talked.", "We agreed."),  # a decision
    ],
)
def test_a_name_a_number_or_a_decision_wins_over_an_otherwise_equal_sentence(
    filler: str, informative: str
) -> None:
    conversation = [message(1, U, filler), message(2, U, informative)]
    keep = [HEADER.format(n=2), f"- user: {informative}"]
    budget = tokens(Message(role=Role.SYSTEM, content="\n".join(keep)))
    assert lines(extractive_summary(conversation, budget, COUNTER)) == keep


def test_every_small_budget_gives_a_system_message_within_it() -> None:
    for budget in range(MIN_SUMMARY_TOKENS, 64):
        summary = extractive_summary(CONVERSATION, budget, COUNTER)
        assert summary.role is Role.SYSTEM
        assert tokens(summary) <= budget, budget
        assert lines(summary)[0] == HEADER.format(n=9)


def test_a_budget_with_room_for_the_header_only_gives_the_header() -> None:
    header = Message(role=Role.SYSTEM, content=HEADER.format(n=1))
    summary = extractive_summary(
        [message(1, U, "Refund order 99812 now.")], tokens(header), COUNTER
    )
    assert summary.content == header.content


SENTENCES = [
    "Hello there!",
    "Ok.",
    "Thanks a lot!",
    "Sounds good to me.",
    "The order id is 48213.",
    "Alice Moreno owns the account.",
    "We agreed to refund the shipping fee.",
    "Delivery is scheduled for March 3 at 10:30.",
    "Can you check the status of my parcel please?",
    "I will call Bob tomorrow about invoice 7781.",
    "The weather is nice today and I am bored, so I am writing a long message about "
    "nothing in particular just to see what happens.",
]


@st.composite
def conversations(draw: st.DrawFn) -> list[StoredMessage]:
    out = []
    for seq in range(10, draw(st.integers(10, 21)) + 1):
        picked = draw(st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=3))
        role = draw(st.sampled_from([U, A]))
        name = draw(st.sampled_from([None, "ann", "Bob"]))
        out.append(message(seq, role, " ".join(picked), name=name, metadata={"sentences": picked}))
    if draw(st.booleans()):
        earlier = "\n".join(
            ["Summary of 3 earlier messages:"]
            + [f"- user: {s}" for s in draw(st.lists(st.sampled_from(SENTENCES), max_size=4))]
        )
        out.insert(0, message(0, Role.SYSTEM, earlier, covers=[1, 2, 3]))
    return out


def candidate_lines(conversation: list[StoredMessage]) -> list[str]:
    """Every line a summary may hold, in order: the sentences each message was made of
    (kept in its metadata), or an earlier summary's lines."""
    out = []
    for m in conversation:
        assert isinstance(m.content, str)
        if m.covers is not None:
            # An earlier summary's lines keep the speaker they were written with.
            out += [ln for ln in m.content.splitlines()[1:]]
            continue
        who = f"{m.role.value} {m.name}" if m.name else m.role.value
        out += [f"- {who}: {s}" for s in m.metadata["sentences"]]
    return out


@PROPERTY
@given(conversations(), st.integers(MIN_SUMMARY_TOKENS, 600))
def test_summaries_stay_within_budget_and_keep_whole_lines_in_order(
    conversation: list[StoredMessage], budget: int
) -> None:
    summary = extractive_summary(conversation, budget, COUNTER)
    assert summary.role is Role.SYSTEM
    assert tokens(summary) <= budget
    n = sum(len(m.covers) if m.covers is not None else 1 for m in conversation)
    header, *body = lines(summary)
    assert header == HEADER.format(n=n)
    candidates = candidate_lines(conversation)
    if len(body) == 1 and body[0].endswith(" ...") and body[0] not in candidates:
        prefix = body[0].removesuffix(" ...")
        assert any(c.startswith(prefix) for c in candidates)
        return
    at = 0
    for line in body:  # each line a candidate, later than the one before
        assert line in candidates[at:], line
        at = candidates.index(line, at) + 1
