"""The default summarizer: deterministic and extractive, with no network.

It keeps the most informative sentences of the messages it folds, in their original
order, each with who said it, within a token budget counted with the memory's own
counter. A sentence scores by how many of the conversation's frequent content words it
carries (per word, so long sentences do not win by length alone), with bonuses for
numbers (amounts, dates, order ids), names (capitalized words inside a sentence) and
decisions (agreed, confirmed, refund, ...). Sentences of an earlier summary compete like
any other, so folding a summary in keeps what mattered most in it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from memory.flush import text_of
from memory.message import Message, Role, StoredMessage
from memory.tokens import TokenCounter

HEADER = "Summary of {n} earlier messages:"

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+|\d[\d.,:/-]*")
_DECISION = re.compile(
    r"\b(agree[ds]?|confirm(?:ed|s)?|decid(?:e|ed|es)|will|must|need(?:s|ed)?|order(?:ed)?|"
    r"refund(?:ed)?|cancel(?:led|ed)?|book(?:ed)?|schedul(?:e|ed)|deadline|approved?|"
    r"resolved?|promised?|prefer(?:s|red)?|allerg\w*|always|never)\b",
    re.IGNORECASE,
)
_STOP = frozenset(
    "a an and are as at be been but by can could did do does for from had has have he her "
    "hi hello his how i if in into is it its just let me my no not of on or our please she "
    "so that the their them then there these they this to too us was we were what when "
    "which who why with would you your yes ok okay thanks thank".split()
)


@dataclass(frozen=True, slots=True)
class _Sentence:
    order: int
    line: str
    score: float
    tokens: int


def _speaker(message: StoredMessage) -> str:
    return f"{message.role.value} {message.name}" if message.name else message.role.value


_LINE = re.compile(r"(?:earlier: )*([^:\n]{1,60}): (.+)")


def _sentences(message: StoredMessage) -> list[tuple[str, str]]:
    """(speaker, sentence) pairs of a message; an earlier summary's lines keep the
    speaker they were written with."""
    text = text_of(message)
    if message.is_summary:
        found = []
        for line in text.splitlines()[1:]:  # past the header
            line = line.strip().removeprefix("- ")
            if line:
                m = _LINE.fullmatch(line)
                found.append((m.group(1), m.group(2)) if m else ("earlier", line))
        return found
    who = _speaker(message)
    found = [(who, s.strip()) for s in _SENTENCE.split(text) if s and s.strip()]
    for call in message.tool_calls or ():
        found.append((who, f"called {call.function.name}({call.function.arguments})"))
    return found


def _score(words: list[str], frequency: Counter[str], sentence: str) -> float:
    content = [w.lower() for w in words if w.lower() not in _STOP]
    if not content:
        return 0.0
    score = sum(frequency[w] for w in set(content)) / math.sqrt(len(content))
    if any(w[0].isdigit() for w in words):
        score += 2.0
    if any(w[0].isupper() for w in words[1:]):
        score += 1.0
    if _DECISION.search(sentence):
        score += 2.0
    return score


def extractive_summary(
    messages: Sequence[StoredMessage], budget: int, counter: TokenCounter
) -> Message:
    """A summary message of ``messages`` that counts at most ``budget`` tokens."""
    header = HEADER.format(n=sum(len(m.covers or [m.seq]) for m in messages))
    raw: list[tuple[str, str, list[str]]] = []
    for m in messages:
        for who, sentence in _sentences(m):
            raw.append((f"- {who}: {sentence}", sentence, _WORD.findall(sentence)))
    frequency: Counter[str] = Counter(
        w.lower() for _, _, words in raw for w in set(words) if w.lower() not in _STOP
    )
    # Only the sentence is scored: the speaker's name is no information.
    sentences = [
        _Sentence(i, line, _score(words, frequency, sentence), counter.text(line + "\n"))
        for i, (line, sentence, words) in enumerate(raw)
    ]
    room = budget - counter.message(_summary(header))
    chosen: list[_Sentence] = []
    for s in sorted(sentences, key=lambda s: (-s.score, s.order)):
        if s.tokens <= room:
            chosen.append(s)
            room -= s.tokens
    chosen.sort(key=lambda s: s.order)
    message = _summary(header, [s.line for s in chosen])
    # Token counts of lines do not add up exactly once joined: drop the least
    # informative line while the whole is over.
    while chosen and counter.message(message) > budget:
        chosen.remove(min(chosen, key=lambda s: (s.score, -s.order)))
        message = _summary(header, [s.line for s in chosen])
    if not chosen and sentences and budget > counter.message(message):
        message = _fit_words(header, max(sentences, key=lambda s: s.score).line, budget, counter)
    return message


def _summary(header: str, lines: Sequence[str] = ()) -> Message:
    return Message(role=Role.SYSTEM, content="\n".join([header, *lines]))


def _fit_words(header: str, line: str, budget: int, counter: TokenCounter) -> Message:
    """The header and as many leading words of ``line`` as fit."""
    words = line.split()
    low, high = 0, len(words)
    while low < high:
        mid = (low + high + 1) // 2
        if counter.message(_summary(header, [" ".join(words[:mid]) + " ..."])) <= budget:
            low = mid
        else:
            high = mid - 1
    return _summary(header, [" ".join(words[:low]) + " ..."] if low else [])
