"""Accountant benchmark: how fast the accountant worker counts applied messages
(messages/s, tokens/s), against raw tiktoken (one thread, and its batch form over the
accountant's counting threads) and ``TokenCounter.message`` on the same messages, in the
same run. See benchmarks/README.md for the method and the figures.

    .venv/bin/python benchmarks/accountant.py --repeat 3
    .venv/bin/python benchmarks/accountant.py --redis-url redis://host:6379 --json

Per repeat, on a fresh namespace: publish every message and apply it with an in-process
appender worker (not timed), then time an in-process accountant worker that counts all
of them, then verify the stored counts against a recount and time the baselines on the
same messages: tiktoken's ``encode_ordinary`` on their texts (in a loop on one thread;
with ``encode_ordinary_batch`` over ``--threads`` threads; and over ``--threads`` threads
with a copy of the encoding each, as the accountant's counting threads have),
``TokenCounter.message`` on the stored messages, and decoding the stored JSON batch by
batch (a part of the accountant's work).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.registry
from harness import (
    Meter,
    RedisTarget,
    Snapshot,
    delete_keys,
    fresh_namespace,
    load_average,
    machine_info,
    redis_info,
    source_version,
)
from report import BrokenRunError, add_report_arguments, finish, log, spread

from events import AppendPayload, MemoryName, MessageAppended, Publisher
from memory import (
    MemoryRef,
    MemoryResource,
    Message,
    ResourceRegistry,
    Role,
    StoredMessage,
    ToolCall,
    partition_for,
)
from memory.message import FunctionCall
from memory.tokens import TokenCounter
from processors import Appender, Settings, Worker, WorkerConfig
from processors.accountant import Accountant
from processors.tokenizers import Tokenizers, split
from store import (
    Accounts,
    Keys,
    Lease,
    MemoryCounts,
    MemoryReader,
    MemoryStore,
    RedisClient,
    Scripts,
    ToCount,
    connect,
    describe,
    ensure_partitions,
)

ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench"
RESOURCE = "customer-support"
PUBLISH_CHUNK = 500  # events per publish_many while loading (not timed)


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    memories: int
    partitions: int
    batch: int
    threads: int
    repeat: int
    seed: int
    redis_url: str | None
    timeout: float
    resources: Path
    json: bool
    save: Path | None = None


# --- the workload: support conversations, deterministic -------------------------------

CUSTOMERS = [
    "Maria Lopez",
    "James O'Connor",
    "Aiko Tanaka",
    "Olusegun Adeyemi",
    "Priya Raman",
    "Lukas Berger",
    "Sofia Rossi",
    "Chen Wei",
    "Fatima Haddad",
    "Mateo García",
    "Zoë Martin",
    "Tomasz Nowak",
    "Amara Okafor",
    "Noah Williams",
    "Ingrid Solberg",
    "Rahul Mehta",
]
AGENTS = ["Dana", "Marco", "Leila", "Sam", "Yuki", "Oskar", "Grace", "Tariq"]
PRODUCTS = [
    "wireless headphones",
    "standing desk",
    "espresso machine",
    "trail running shoes",
    "27-inch 4K monitor",
    "air purifier",
    "carry-on suitcase",
    "smart watch",
    "high-speed blender",
    "ergonomic office chair",
    "robot vacuum",
    "mechanical keyboard",
]
CITIES = ["Rotterdam", "Leeds", "Lyon", "Denver", "Osaka", "Kraków", "Austin", "Porto"]
CARRIERS = ["DHL", "UPS", "FedEx", "the postal service", "DPD"]
STREETS = ["Harbour Road", "Elm Street", "Rue de la Paix", "Kingsway", "Maple Avenue"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August"]

USER_SENTENCES = [
    "Hi, I ordered the {product} on {date} and it still hasn't arrived.",
    "My order number is {order}.",
    "I was charged {amount} twice for the same order, can you check that?",
    "The tracking page says it was delivered in {city}, but I live in {city2}.",
    "Could I get a refund instead of a replacement?",
    "I've been a customer for {years} years and this is the first time something like "
    "this has happened.",
    "The box was damaged and the {product} doesn't turn on at all.",
    "Can you send it to my office instead? The address is {house} {street}, {city2}.",
    "Please ask {agent} to call me back, they helped me last week.",
    "Is there any way to speed this up? I need it before {date}.",
    "I tried resetting it like the manual says, holding the button for {n} seconds, but "
    "nothing happened.",
    "Thanks, that helps a lot.",
    "Honestly I'm a bit frustrated, this is the third time I'm writing about this.",
    "What is your return policy for items bought on sale?",
    "The app shows status code {code} when I try to pair it.",
    "ok",
    "Sorry, one more thing: the invoice lists {qty} items but I only ordered one.",
    "I'd rather not pay the {amount} restocking fee, the item was faulty when it came.",
]
ASSISTANT_SENTENCES = [
    "Thanks for reaching out, {name}, and I'm sorry about the trouble with your {product}.",
    "I checked order {order}: it left our warehouse in {city} on {date} with {carrier}.",
    "The carrier shows it at the local depot, so it should arrive within {n} business days.",
    "I can see two charges of {amount}; one of them is a pre-authorization that drops "
    "off within 3 to 5 business days.",
    "I've issued a refund of {amount} to your original payment method.",
    "You'll get a confirmation shortly, and the refund usually shows up within 5 to 10 "
    "business days, depending on your bank.",
    "Our return window is {window} days from delivery, and sale items are included.",
    "I've created a prepaid return label; print it and drop the parcel at any {carrier} location.",
    "Could you confirm the serial number printed under the {product}? It starts with {serial}.",
    "If the replacement hasn't arrived by {date}, reply here and I'll escalate it to "
    "{agent} on our logistics team.",
    "Is there anything else I can help you with today?",
    "I understand this is frustrating, and I appreciate your patience.",
    "As a thank-you for your patience I've added a {percent}% discount code to your "
    "account: {voucher}.",
    "Status code {code} usually means the firmware is out of date; updating it from the "
    "app's settings page fixes it in most cases.",
    "I've corrected the invoice to one item; the new total is {amount} including VAT.",
    "Let me summarize: we'll ship a replacement {product} today and you'll keep the "
    "original until the courier collects it.",
]
TOOLS = ["lookup_order", "get_tracking", "issue_refund", "create_return_label", "search_kb"]


@dataclass(frozen=True, slots=True)
class Conversation:
    """What stays the same within one memory's conversation."""

    name: str
    agent: str
    product: str
    order: str
    city: str
    city2: str
    carrier: str
    street: str


def slots(rng: random.Random, c: Conversation) -> dict[str, object]:
    """Values for one message's sentences (numbers and dates vary per message)."""
    currency = rng.choice(["$", "€", "£"])
    return {
        "name": c.name.split()[0],
        "agent": c.agent,
        "product": c.product,
        "order": c.order,
        "city": c.city,
        "city2": c.city2,
        "carrier": c.carrier,
        "street": c.street,
        "house": rng.randint(1, 240),
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "amount": f"{currency}{rng.randint(5, 1400)}.{rng.randint(0, 99):02d}",
        "years": rng.randint(2, 15),
        "n": rng.randint(2, 30),
        "window": rng.choice([14, 30, 60]),
        "qty": rng.randint(2, 5),
        "percent": rng.choice([10, 15, 20]),
        "code": f"E{rng.randint(100, 999)}",
        "serial": f"SN-{rng.randint(10, 99)}{rng.choice('ABCDEFGHJK')}",
        "voucher": f"THANKS-{rng.randint(1000, 9999)}{rng.choice('XYZQ')}",
    }


def chat_text(rng: random.Random, sentences: Sequence[str], c: Conversation) -> str:
    """20 to 400 words of chat: sentences drawn from ``sentences``, cut to the length."""
    words = rng.randint(20, 400)
    values = slots(rng, c)
    out: list[str] = []
    while len(out) < words:
        out += rng.choice(sentences).format(**values).split()
    text = " ".join(out[:words])
    if rng.random() < 0.05:
        text += rng.choice([" 🙂", " 👍", " 🙏"])
    return text


def tool_result(rng: random.Random, tool: str, c: Conversation) -> str:
    events = [
        {
            "at": f"2024-{rng.randint(1, 8):02d}-{rng.randint(1, 28):02d}T"
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z",
            "location": rng.choice(CITIES),
            "status": rng.choice(["picked_up", "in_transit", "at_depot", "out_for_delivery"]),
        }
        for _ in range(rng.randint(1, 12))
    ]
    return json.dumps(
        {
            "tool": tool,
            "order_id": c.order,
            "customer": c.name,
            "items": [{"sku": f"SKU-{rng.randint(10000, 99999)}", "name": c.product}],
            "carrier": c.carrier,
            "events": events,
        }
    )


def conversation(seed: int, m: int, count: int) -> list[Message]:
    """Memory ``m``'s ``count`` messages: a user opens, the assistant answers; about one
    assistant turn in seven calls a tool (the call, the tool's JSON result, then the
    answer); about one assistant message in four carries a name."""
    rng = random.Random(f"{seed}/{m}")
    c = Conversation(
        name=rng.choice(CUSTOMERS),
        agent=rng.choice(AGENTS),
        product=rng.choice(PRODUCTS),
        order=f"A-{rng.randint(1_000_000, 9_999_999)}",
        city=rng.choice(CITIES),
        city2=rng.choice(CITIES),
        carrier=rng.choice(CARRIERS),
        street=rng.choice(STREETS),
    )
    out: list[Message] = []
    while len(out) < count:
        out.append(Message(role=Role.USER, content=chat_text(rng, USER_SENTENCES, c)))
        if rng.random() < 1 / 7:
            tool = rng.choice(TOOLS)
            call_id = f"call_{rng.getrandbits(64):016x}"
            arguments = json.dumps({"order_id": c.order, "reason": rng.choice(["status", "lost"])})
            call = ToolCall(id=call_id, function=FunctionCall(name=tool, arguments=arguments))
            out.append(Message(role=Role.ASSISTANT, tool_calls=[call]))
            out.append(
                Message(role=Role.TOOL, tool_call_id=call_id, content=tool_result(rng, tool, c))
            )
        name = f"agent_{c.agent.lower()}" if rng.random() < 0.25 else None
        text = chat_text(rng, ASSISTANT_SENTENCES, c)
        out.append(Message(role=Role.ASSISTANT, content=text, name=name))
    return out[:count]


def memory_key(m: int) -> str:
    return f"support-{m:05d}"


@dataclass(frozen=True, slots=True)
class Workload:
    """Message g goes to memory g % M at position g // M (as in the append benchmark)."""

    refs: list[MemoryRef]
    messages: list[list[Message]]  # per memory, in order

    @classmethod
    def build(cls, n: int, memories: int, seed: int) -> Workload:
        counts = [n // memories + (1 if m < n % memories else 0) for m in range(memories)]
        return cls(
            [MemoryRef(TENANT, RESOURCE, memory_key(m)) for m in range(memories)],
            [conversation(seed, m, counts[m]) for m in range(memories)],
        )

    @property
    def size(self) -> int:
        return sum(len(ms) for ms in self.messages)

    def publish_order(self) -> Iterator[tuple[MemoryRef, Message]]:
        longest = max(len(ms) for ms in self.messages)
        for i in range(longest):
            for ref, ms in zip(self.refs, self.messages, strict=True):
                if i < len(ms):
                    yield ref, ms[i]

    def shape(self) -> dict[str, Any]:
        flat = [msg for ms in self.messages for msg in ms]
        texts = [t for msg in flat for t in texts_of(msg)]
        return {
            "roles": {r.value: n for r in Role if (n := sum(msg.role is r for msg in flat))},
            "tool_calls": sum(len(msg.tool_calls or ()) for msg in flat),
            "named": sum(msg.name is not None for msg in flat),
            "text_bytes_per_msg": round(sum(len(t.encode()) for t in texts) / len(flat)),
            "words_per_msg": round(sum(len(t.split()) for t in texts) / len(flat), 1),
        }


def texts_of(message: Message | StoredMessage) -> list[str]:
    """The texts ``TokenCounter.message`` encodes, but the role: content (or its text
    parts), name, tool call names and arguments, the id of the call it answers."""
    out: list[str] = []
    content = message.content
    if isinstance(content, str):
        out.append(content)
    elif content is not None:
        out += [part.text for part in content if part.text is not None]
    if message.name:
        out.append(message.name)
    for call in message.tool_calls or ():
        out += [call.function.name, call.function.arguments]
    if message.tool_call_id:
        out.append(message.tool_call_id)
    return [t for t in out if t]


def same_message(stored: StoredMessage, original: Message) -> bool:
    return (
        stored.role is original.role
        and stored.content == original.content
        and stored.name == original.name
        and stored.tool_calls == original.tool_calls
        and stored.tool_call_id == original.tool_call_id
    )


# --- the accountant, instrumented ------------------------------------------------------


class TimedAccounts(Accounts):
    """The accountant's store, noting when the worker first reads messages and when
    the batch that counted the last expected message was applied (and the CPU time of
    this thread, the event loop's, and of the whole process then)."""

    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys, expected: int) -> None:
        super().__init__(client, scripts, keys)
        self.expected = expected
        self.counted = 0
        self.flush_requests = 0
        self.batches = 0
        self.first_read: float | None = None
        self.done_at: float | None = None
        self.start_cpu = (0.0, 0.0)  # this thread, the process
        self.done_cpu: tuple[float, float] | None = None
        self.done = asyncio.Event()

    async def messages(
        self,
        partition: int,
        wanted: dict[str, set[int]],
        rules: Mapping[str, str] | None = None,
    ) -> dict[str, ToCount]:
        if self.first_read is None:
            self.first_read = time.perf_counter()
        found = await super().messages(partition, wanted, rules)
        self._read_end = (time.perf_counter(), time.process_time())
        return found

    async def apply(
        self, lease: Lease, memories: Sequence[MemoryCounts], entry_ids: Sequence[str]
    ) -> tuple[int, int]:
        self.batches += 1
        counted, requests = await super().apply(lease, memories, entry_ids)
        self.counted += counted
        self.flush_requests += requests
        if self.counted >= self.expected and self.done_at is None:
            self.done_at = time.perf_counter()
            self.done_cpu = (time.thread_time(), time.process_time())
            self.done.set()
        return counted, requests


class TimedAccountant(Accountant):
    """The accountant, timing its counting: the formula and the encoding of each batch,
    a stretch without an await (so its time is exact even with every partition's loop
    on the event loop), in this thread and, for part of the encoding, on the counting
    threads."""

    def __init__(
        self, accounts: Accounts, registry: ResourceRegistry, tokenizers: Tokenizers
    ) -> None:
        super().__init__(accounts, registry, tokenizers)
        self.counting_s = 0.0
        self.counting_cpu_s = 0.0  # this thread's

    def _count(self, memories: Any) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        super()._count(memories)
        self.counting_s += time.perf_counter() - t0
        self.counting_cpu_s += time.thread_time() - c0


# --- one run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pass:
    """One timed pass over the messages: wall and CPU seconds (this process)."""

    wall_s: float
    cpu_s: float
    tokens: int

    def __add__(self, other: Pass) -> Pass:
        return Pass(
            self.wall_s + other.wall_s, self.cpu_s + other.cpu_s, self.tokens + other.tokens
        )

    def figures(self, messages: int) -> dict[str, float]:
        return {
            "msg_per_s": round(messages / self.wall_s, 1),
            "tokens_per_s": round(self.tokens / self.wall_s),
            "us_per_msg": round(self.wall_s * 1e6 / messages, 2),
            "cpu_us_per_msg": round(self.cpu_s * 1e6 / messages, 2),
            "tokens_per_msg": round(self.tokens / messages, 2),
        }


def timed(fn: Callable[[], int]) -> Pass:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    tokens = fn()
    return Pass(time.perf_counter() - t0, time.process_time() - c0, tokens)


class OwnEncodings:
    """``threads`` threads, each with a copy of the encoding of its own (as the
    accountant's counting threads have: threads sharing one tiktoken encoder contend in
    it), encoding runs of texts at the same time."""

    def __init__(self, name: str, threads: int) -> None:
        tiktoken.list_encoding_names()
        constructors = tiktoken.registry.ENCODING_CONSTRUCTORS
        assert constructors is not None
        self._threads = [ThreadPoolExecutor(1) for _ in range(threads)]
        # Each copy is built and first used in the thread that will use it.
        self._encodings = [
            pool.submit(lambda: tiktoken.Encoding(**constructors[name]())).result()
            for pool in self._threads
        ]
        self.count(["warm up, " * 100] * threads)

    def count(self, texts: Sequence[str]) -> int:
        """The tokens of every text, the texts cut into one run per thread."""
        runs = split(texts, len(self._threads))
        futures = [
            pool.submit(lambda e, run: sum(len(e.encode_ordinary(t)) for t in run), enc, run)
            for pool, enc, run in zip(self._threads, self._encodings, runs, strict=False)
        ]
        return sum(f.result() for f in futures)

    def close(self) -> None:
        for pool in self._threads:
            pool.shutdown()


def decode_by_batch(raw: list[str], batch: int) -> int:
    """Decode the stored JSON ``batch`` messages at a time, keeping none of them (as the
    accountant does: a whole backlog of objects kept alive costs the collector more)."""
    validate = StoredMessage.model_validate_json
    return sum(len([validate(t) for t in raw[i : i + batch]]) for i in range(0, len(raw), batch))


@dataclass(frozen=True, slots=True)
class Baselines:
    """One round of the in-process baselines over the same N messages."""

    raw_tiktoken: Pass  # encode_ordinary of each text TokenCounter would encode
    raw_tiktoken_threads: Pass  # the same texts, encode_ordinary_batch over the threads
    raw_own_threads: Pass  # the same texts over the threads, each with its own encoding
    token_counter: Pass  # TokenCounter.message of each stored message
    decode: Pass  # StoredMessage.model_validate_json of each stored JSON, batch by batch

    @classmethod
    def measure(
        cls,
        counter: TokenCounter,
        tokenizers: Tokenizers,
        stored: list[StoredMessage],
        raw: list[str],
        batch: int,
        own: OwnEncodings,
    ) -> Baselines:
        texts = [t for m in stored for t in texts_of(m)]
        encoding = tokenizers.encoder(counter.name)
        encode, threads = encoding.encode_ordinary, tokenizers.threads
        message = counter.message
        return cls(
            raw_tiktoken=timed(lambda: sum(len(encode(t)) for t in texts)),
            raw_tiktoken_threads=timed(
                lambda: sum(map(len, encoding.encode_ordinary_batch(texts, num_threads=threads)))
            ),
            raw_own_threads=timed(lambda: own.count(texts)),
            token_counter=timed(lambda: sum(message(m) for m in stored)),
            decode=timed(lambda: decode_by_batch(raw, batch)),
        )

    def __add__(self, other: Baselines) -> Baselines:
        return Baselines(
            self.raw_tiktoken + other.raw_tiktoken,
            self.raw_tiktoken_threads + other.raw_tiktoken_threads,
            self.raw_own_threads + other.raw_own_threads,
            self.token_counter + other.token_counter,
            self.decode + other.decode,
        )


@dataclass
class Run:
    messages: int
    raw_tiktoken: dict[str, float]  # both rounds together
    raw_tiktoken_threads: dict[str, float]
    raw_own_threads: dict[str, float]
    token_counter: dict[str, float]
    accountant: dict[str, float]
    decode_us_per_msg: float  # CPU of StoredMessage.model_validate_json, batch by batch
    counting_us_per_msg: dict[str, float]  # wall; CPU in this thread, in the helpers
    startup_ms: float  # worker start -> its first read of stored messages
    batches: int
    flush_requests: int
    cpu_us_per_msg: dict[str, float | None]  # over the accountant's window
    redis_calls_per_msg: float
    redis_top_calls: dict[str, int]
    background_cores: float | None
    ratios: dict[str, float]
    drift: dict[str, float]  # baseline msg/s, round after / round before the accountant
    checked: str


async def load(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    workload: Workload,
    registry: ResourceRegistry,
    settings: Settings,
    partitions: int,
    timeout: float,
) -> None:
    """Publish every message, then apply them all with an appender worker (not timed)."""
    publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=partitions)
    if await publisher.partitions() != partitions:
        raise BrokenRunError("the namespace holds another partition count")
    events = [
        MessageAppended(
            tenant=TENANT,
            payload=AppendPayload(memory=MemoryName(resource=RESOURCE, key=ref.key), message=msg),
        )
        for ref, msg in workload.publish_order()
    ]
    for i in range(0, len(events), PUBLISH_CHUNK):
        await publisher.publish_many(events[i : i + PUBLISH_CHUNK])
    appender = Appender(
        MemoryStore(scripts, keys, settings.retention()),
        keys,
        registry,
        partitions,
        max_event_bytes=settings.max_event_bytes,
    )
    worker = Worker(
        client, scripts, keys, appender, partitions, settings.worker_config(), "bench-appender"
    )
    async with asyncio.timeout(timeout):
        await worker.run(asyncio.Event(), until_idle=True)


async def dead_letters(client: RedisClient, keys: Keys, partitions: int) -> int:
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xlen(keys.dlq(p))
    return sum(int(n) for n in await pipe.execute())


async def verify(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    workload: Workload,
    counter: TokenCounter,
    partitions: int,
    *,
    counted: bool,
) -> tuple[list[StoredMessage], int]:
    """Every memory holds its messages as published and no dead letters; with
    ``counted``, each message is counted once and the stored counts (per message and
    per memory) equal a recount, else none is counted yet. Returns the stored messages
    and the stored token total, or raises BrokenRunError."""
    reader = MemoryReader(client, scripts, keys)
    stored: list[StoredMessage] = []
    problems: list[str] = []
    total = 0
    for ref, originals in zip(workload.refs, workload.messages, strict=True):
        view = await reader.read(ref)
        if len(view.messages) != len(originals) or not all(
            same_message(s, o) for s, o in zip(view.messages, originals, strict=True)
        ):
            problems.append(f"{ref.memory_id}: does not hold exactly its messages")
        if counted:
            recount = [counter.message(m) for m in view.messages]
            if view.token_counts != recount:
                problems.append(f"{ref.memory_id}: per-message counts differ from a recount")
            if view.tokens != sum(recount) or view.counted != len(originals):
                problems.append(
                    f"{ref.memory_id}: {view.tokens} tokens over {view.counted} counted "
                    f"messages stored, recount {sum(recount)} over {len(originals)}"
                )
        elif view.counted or view.tokens:
            problems.append(f"{ref.memory_id}: counted before the accountant ran")
        total += view.tokens
        stored += view.messages
    letters = await dead_letters(client, keys, partitions)
    if letters:
        problems.append(f"{letters} dead letters")
    if problems:
        raise BrokenRunError("; ".join(problems[:5]))
    return stored, total


async def stored_json(
    client: RedisClient, keys: Keys, workload: Workload, partitions: int
) -> list[str]:
    """The stored JSON of every message (what the accountant reads and decodes)."""
    pipe = client.pipeline(transaction=False)
    for ref in workload.refs:
        p = partition_for(ref.memory_id, partitions)
        pipe.zrange(keys.memory(p, ref.memory_id).log, 0, -1)
    return [str(t) for texts in await pipe.execute() for t in texts]


async def run_accountant(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    registry: ResourceRegistry,
    tokenizers: Tokenizers,
    config: WorkerConfig,
    partitions: int,
    expected: int,
    timeout: float,
) -> tuple[TimedAccounts, TimedAccountant, float, Snapshot, Snapshot]:
    """An accountant worker, in this process, until every partition is idle; timed
    from its start to the end of the batch that counted the last message."""
    accounts = TimedAccounts(client, scripts, keys, expected)
    accountant = TimedAccountant(accounts, registry, tokenizers)
    worker = Worker(client, scripts, keys, accountant, partitions, config, "bench-accountant")
    meter = Meter(client)

    async def after_done() -> Snapshot:
        await accounts.done.wait()
        return await meter.snapshot()

    # What this process holds (the workload, the messages read back: some 200,000
    # objects a worker does not have) is left out of the collector's passes during the
    # window, as `memstream run` leaves out its start-up objects.
    gc.collect()
    gc.freeze()
    before = await meter.snapshot()
    watcher = asyncio.create_task(after_done())
    accounts.start_cpu = (time.thread_time(), time.process_time())
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await worker.run(asyncio.Event(), until_idle=True)
    finally:
        gc.unfreeze()
        if not accounts.done.is_set():
            watcher.cancel()
    if accounts.done_at is None:
        raise BrokenRunError(
            f"the accountant counted {accounts.counted} of {expected} messages, then went idle"
        )
    after = await watcher
    return accounts, accountant, t0, before, after


async def one_run(
    opts: Options,
    url: str,
    workload: Workload,
    registry: ResourceRegistry,
    resource: MemoryResource,
    tokenizers: Tokenizers,
    settings: Settings,
    own: OwnEncodings,
) -> Run:
    """Load a fresh namespace, then: baselines, the accountant (timed), verification,
    baselines again. The run's baseline is both rounds together, so drift of the
    machine's speed during the run is shared by both sides of the ratios."""
    namespace = fresh_namespace("bench-acct")
    keys = Keys(namespace)
    client = connect(url)
    counter = tokenizers.for_resource(resource)
    n = workload.size
    try:
        scripts = Scripts(client)
        await scripts.load()
        partitions = await ensure_partitions(client, keys, opts.partitions)
        await load(client, scripts, keys, workload, registry, settings, partitions, opts.timeout)
        stored, _ = await verify(
            client, scripts, keys, workload, counter, partitions, counted=False
        )
        raw_json = await stored_json(client, keys, workload, partitions)
        first = Baselines.measure(counter, tokenizers, stored, raw_json, opts.batch, own)

        accounts, timed, t0, before, after = await run_accountant(
            client,
            scripts,
            keys,
            registry,
            tokenizers,
            settings.worker_config(),
            partitions,
            n,
            opts.timeout,
        )
        assert accounts.done_at is not None and accounts.first_read is not None
        usage = Meter.usage(before, after, n)
        if accounts.counted != n:
            raise BrokenRunError(f"the accountant counted {accounts.counted} messages, not {n}")
        stored, stored_total = await verify(
            client, scripts, keys, workload, counter, partitions, counted=True
        )
        second = Baselines.measure(counter, tokenizers, stored, raw_json, opts.batch, own)
        if second.token_counter.tokens != stored_total:
            raise BrokenRunError(
                f"stored {stored_total} tokens, TokenCounter {second.token_counter.tokens}"
            )

        both = first + second
        raw, formula = both.raw_tiktoken.figures(2 * n), both.token_counter.figures(2 * n)
        raw_threads = both.raw_tiktoken_threads.figures(2 * n)
        raw_own = both.raw_own_threads.figures(2 * n)
        tokens = {both.raw_tiktoken_threads.tokens, both.raw_own_threads.tokens}
        if tokens != {both.raw_tiktoken.tokens}:
            raise BrokenRunError("the threaded baselines count other tokens than one thread")
        acct_cpu = usage.cpu_us_per_msg["producer"]
        acct = Pass(accounts.done_at - t0, (acct_cpu or math.nan) * n / 1e6, stored_total)
        accountant = acct.figures(n)
        assert accounts.done_cpu is not None
        # The process's CPU beyond this thread's is the counting threads' (nothing else
        # runs in it meanwhile).
        main_s = accounts.done_cpu[0] - accounts.start_cpu[0]
        process_s = accounts.done_cpu[1] - accounts.start_cpu[1]
        return Run(
            messages=n,
            raw_tiktoken=raw,
            raw_tiktoken_threads=raw_threads,
            raw_own_threads=raw_own,
            token_counter=formula,
            accountant=accountant,
            decode_us_per_msg=both.decode.figures(2 * n)["cpu_us_per_msg"],
            counting_us_per_msg={
                "wall": round(timed.counting_s * 1e6 / n, 2),
                "cpu": round((timed.counting_cpu_s + process_s - main_s) * 1e6 / n, 2),
                "cpu_helpers": round((process_s - main_s) * 1e6 / n, 2),
            },
            startup_ms=round((accounts.first_read - t0) * 1000, 1),
            batches=accounts.batches,
            flush_requests=accounts.flush_requests,
            cpu_us_per_msg={"accountant_process": acct_cpu, "redis": usage.cpu_us_per_msg["redis"]},
            redis_calls_per_msg=usage.redis_calls_per_msg,
            redis_top_calls=usage.redis_top_calls,
            background_cores=usage.background_cores,
            ratios={
                "msg_per_s_vs_raw_tiktoken": accountant["msg_per_s"] / raw["msg_per_s"],
                "msg_per_s_vs_raw_tiktoken_threads": accountant["msg_per_s"]
                / raw_threads["msg_per_s"],
                "msg_per_s_vs_raw_own_threads": accountant["msg_per_s"] / raw_own["msg_per_s"],
                "msg_per_s_vs_token_counter": accountant["msg_per_s"] / formula["msg_per_s"],
                "tokens_per_s_vs_raw_tiktoken": accountant["tokens_per_s"] / raw["tokens_per_s"],
                "msg_per_cpu_s_vs_raw_tiktoken": raw["cpu_us_per_msg"]
                / accountant["cpu_us_per_msg"],
                "msg_per_cpu_s_vs_token_counter": formula["cpu_us_per_msg"]
                / accountant["cpu_us_per_msg"],
            },
            drift={
                "raw_tiktoken": first.raw_tiktoken.wall_s / second.raw_tiktoken.wall_s,
                "raw_tiktoken_threads": first.raw_tiktoken_threads.wall_s
                / second.raw_tiktoken_threads.wall_s,
                "raw_own_threads": first.raw_own_threads.wall_s / second.raw_own_threads.wall_s,
                "token_counter": first.token_counter.wall_s / second.token_counter.wall_s,
            },
            checked=(
                f"{len(workload.refs)} memories hold exactly their {n} messages; every "
                f"stored count, per message and per memory, equals a recount with "
                f"TokenCounter; no dead letters"
            ),
        )
    finally:
        with contextlib.suppress(Exception):
            await delete_keys(client, f"{namespace}:*")
        await client.aclose()


# --- the run, the report ------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Median and range over the repeats; ratios are taken per run, then summarized."""

    def over(values: list[float | None]) -> dict[str, float]:
        return spread([float(v) for v in values if v is not None])

    out: dict[str, Any] = {}
    for system in (
        "raw_tiktoken",
        "raw_tiktoken_threads",
        "raw_own_threads",
        "token_counter",
        "accountant",
    ):
        figures: list[dict[str, float]] = [getattr(r, system) for r in runs]
        out[system] = {
            key: over([f[key] for f in figures])
            for key in ("msg_per_s", "tokens_per_s", "us_per_msg", "cpu_us_per_msg")
        }
    out["ratios"] = {key: over([r.ratios[key] for r in runs]) for key in runs[0].ratios}
    out["accountant_breakdown_us_per_msg"] = {
        "counting_wall": over([r.counting_us_per_msg["wall"] for r in runs]),
        "counting_cpu": over([r.counting_us_per_msg["cpu"] for r in runs]),
        "counting_cpu_helpers": over([r.counting_us_per_msg["cpu_helpers"] for r in runs]),
        "decode": over([r.decode_us_per_msg for r in runs]),
        "accountant_process_cpu": over([r.cpu_us_per_msg["accountant_process"] for r in runs]),
        "redis_cpu": over([r.cpu_us_per_msg["redis"] for r in runs]),
    }
    out["redis_calls_per_msg"] = over([r.redis_calls_per_msg for r in runs])
    out["startup_ms"] = over([r.startup_ms for r in runs])
    out["baseline_drift"] = {key: over([r.drift[key] for r in runs]) for key in runs[0].drift}
    out["background_cores"] = [r.background_cores for r in runs]
    return out


async def run(opts: Options) -> dict[str, Any]:
    settings = Settings(
        partitions=opts.partitions,
        resources=str(opts.resources),
        batch_size=opts.batch,
        count_threads=opts.threads,
    )
    registry = ResourceRegistry.load(settings.resource_paths())
    resource = registry.find(RESOURCE)
    if resource is None:
        raise BrokenRunError(f"no {RESOURCE} resource in {opts.resources}")
    tokenizers = Tokenizers(threads=settings.count_threads)
    counter = tokenizers.for_resource(resource)
    log(f"building {opts.messages:,} messages over {opts.memories} memories ...")
    workload = Workload.build(opts.messages, opts.memories, opts.seed)
    # The encoder, and the counting threads' own copies of it, are loaded and warm before
    # anything is timed.
    for ms in workload.messages[:8]:
        for m in ms:
            counter.message(m)
        counter.messages(ms)
    own = OwnEncodings(counter.name, settings.count_threads)
    target = (
        RedisTarget(opts.redis_url, "", False)
        if opts.redis_url
        else RedisTarget.start(appendonly=False)
    )
    try:
        client = connect(target.url)
        try:
            info = await redis_info(client)
        finally:
            await client.aclose()
        target.version = str(info.get("redis_version", target.version))
        load_start = load_average()
        runs: list[Run] = []
        for r in range(opts.repeat):
            log(f"[{r + 1}/{opts.repeat}] publish + append (not timed), then the accountant ...")
            result = await one_run(
                opts, target.url, workload, registry, resource, tokenizers, settings, own
            )
            log(f"    {one_line(result)}")
            runs.append(result)
    finally:
        own.close()
        tokenizers.close()
        target.stop()
    return {
        "benchmark": "accountant",
        "source": source_version(ROOT),
        "config": {
            "messages": workload.size,
            "memories": opts.memories,
            "partitions": opts.partitions,
            "accountant_batch": settings.batch_size,
            "count_threads": settings.count_threads,
            "repeat": opts.repeat,
            "seed": opts.seed,
            "tenant": TENANT,
            "resource": RESOURCE,
            "model": resource.model,
            "encoding": counter.name,
            "tiktoken": metadata.version("tiktoken"),
            "workload": workload.shape(),
        },
        "redis": {
            "version": target.version,
            "url": describe(target.url),
            "temporary": target.started,
            "binary": target.binary,
        },
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_average()},
        "summary": summarize(runs),
        "runs": [asdict(r) for r in runs],
    }


def one_line(r: Run) -> str:
    a, raw, tc = r.accountant, r.raw_tiktoken, r.token_counter
    return (
        f"accountant {a['msg_per_s']:,.0f} msg/s ({a['tokens_per_s']:,.0f} tok/s), raw tiktoken "
        f"{raw['msg_per_s']:,.0f} msg/s (threads {r.raw_tiktoken_threads['msg_per_s']:,.0f}), "
        f"TokenCounter {tc['msg_per_s']:,.0f} msg/s; ratio "
        f"{r.ratios['msg_per_s_vs_raw_tiktoken']:.3f} (raw) "
        f"{r.ratios['msg_per_s_vs_raw_tiktoken_threads']:.3f} (raw, threads) "
        f"{r.ratios['msg_per_s_vs_token_counter']:.3f} (TokenCounter)"
        f"; background {r.background_cores} CPUs"
    )


def fmt(s: dict[str, float], digits: int, repeat: int) -> str:
    if repeat == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def render(report: dict[str, Any]) -> str:
    c, rd, mc, s = report["config"], report["redis"], report["machine"], report["summary"]
    k = c["repeat"]
    w = c["workload"]
    where = "temporary redis-server" if rd["temporary"] else "given server"
    lines = [
        f"memstream accountant benchmark (source {report['source']})",
        f"  Redis {rd['version']} ({where}) at {rd['url']}",
        f"  machine: {mc['cpus']} CPUs ({mc['cpu_model']}), {mc['platform']}, "
        f"Python {mc['python']}; load average {mc['loadavg_start']} -> {mc['loadavg_end']}",
        f"  N={c['messages']:,} messages over M={c['memories']} memories of {c['resource']} "
        f"({c['model']}: {c['encoding']}, tiktoken {c['tiktoken']}), {c['partitions']} "
        f"partitions, accountant batch "
        f"{c['accountant_batch']}, {c['count_threads']} counting thread(s), seed {c['seed']}",
        f"  workload: {w['words_per_msg']} words, {w['text_bytes_per_msg']} B of text per "
        f"message; roles {w['roles']}; {w['tool_calls']} tool calls, {w['named']} named",
        f"  figures: median of {k} run(s)" + (" (min-max)" if k > 1 else ""),
        "",
        f"{'':<44}{'msg/s':>24}{'tokens/s':>32}{'us/msg':>22}{'CPU us/msg':>22}",
    ]
    names = {
        "raw_tiktoken": "raw tiktoken, 1 thread (encode_ordinary)",
        "raw_tiktoken_threads": f"raw, encode_ordinary_batch, {c['count_threads']} threads",
        "raw_own_threads": f"raw, {c['count_threads']} threads with an encoding each",
        "token_counter": "TokenCounter.message (the formula)",
        "accountant": "accountant worker (in-process, until idle)",
    }
    for system, label in names.items():
        f = s[system]
        lines.append(
            f"{label:<44}{fmt(f['msg_per_s'], 0, k):>24}{fmt(f['tokens_per_s'], 0, k):>32}"
            f"{fmt(f['us_per_msg'], 1, k):>22}{fmt(f['cpu_us_per_msg'], 1, k):>22}"
        )
    r, b = s["ratios"], s["accountant_breakdown_us_per_msg"]
    ratios = [
        ("accountant / raw tiktoken (1 thread), msg/s", r["msg_per_s_vs_raw_tiktoken"], 3),
        (
            f"accountant / raw encode_ordinary_batch ({c['count_threads']} threads), msg/s",
            r["msg_per_s_vs_raw_tiktoken_threads"],
            3,
        ),
        (
            f"accountant / raw, {c['count_threads']} threads with an encoding each, msg/s",
            r["msg_per_s_vs_raw_own_threads"],
            3,
        ),
        ("accountant / TokenCounter, msg/s", r["msg_per_s_vs_token_counter"], 3),
        ("accountant / raw tiktoken, tokens/s (1)", r["tokens_per_s_vs_raw_tiktoken"], 3),
        ("accountant / raw tiktoken, msg per CPU-s (2)", r["msg_per_cpu_s_vs_raw_tiktoken"], 3),
        ("accountant / TokenCounter, msg per CPU-s (2)", r["msg_per_cpu_s_vs_token_counter"], 3),
    ]
    parts = [
        ("counting inside the accountant, wall", b["counting_wall"], 1),
        ("counting inside the accountant, CPU (all threads)", b["counting_cpu"], 1),
        ("  of which on the helper threads", b["counting_cpu_helpers"], 1),
        ("decoding the stored JSON (timed apart, CPU)", b["decode"], 1),
        ("CPU of the accountant's process over the window", b["accountant_process_cpu"], 1),
        ("CPU of Redis over the window", b["redis_cpu"], 1),
        ("Redis calls per message (Lua-internal included)", s["redis_calls_per_msg"], 2),
        ("worker start -> its first read of messages, ms", s["startup_ms"], 1),
    ]
    drift = s["baseline_drift"]
    lines += [
        "",
        "ratios (per run, then the median):",
        *[f"  {label:<60}{fmt(v, d, k)}" for label, v, d in ratios],
        "  (1) the accountant's tokens include the formula's framing, raw tiktoken's do not",
        "  (2) CPU of this process only; Redis's CPU is apart, below",
        "",
        "where the accountant's time goes, us per message:",
        *[f"  {label:<60}{fmt(v, d, k)}" for label, v, d in parts],
        "",
        f"baseline rounds, before / after the accountant, wall: raw tiktoken "
        f"{fmt(drift['raw_tiktoken'], 2, k)}, threads "
        f"{fmt(drift['raw_tiktoken_threads'], 2, k)}, an encoding each "
        f"{fmt(drift['raw_own_threads'], 2, k)}, TokenCounter "
        f"{fmt(drift['token_counter'], 2, k)}",
        f"other work on the machine during the accountant, CPUs busy: {s['background_cores']}",
    ]
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="memstream accountant throughput (messages/s, tokens/s) against raw "
        "tiktoken and TokenCounter.message on the same messages, in the same run",
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--messages", type=int, default=20_000, help="N messages (default 20000)")
    p.add_argument("--memories", type=int, default=200, help="M memories (default 200)")
    p.add_argument("--partitions", type=int, default=16, help="partition count (default 16)")
    p.add_argument(
        "--batch", type=int, default=100, help="accountant batch size, entries (default 100)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=Settings.model_fields["count_threads"].default,
        help="the accountant's counting threads (MEMSTREAM_COUNT_THREADS), also the threads "
        "of the raw encode_ordinary_batch figure (default: the setting's default)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs, figures are medians (default 1)")
    p.add_argument("--seed", type=int, default=7, help="workload seed (default 7)")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for a worker")
    add_report_arguments(p, ROOT / "memories")
    a = p.parse_args(argv)
    for name in ("messages", "memories", "partitions", "batch", "threads", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.messages < a.memories:
        p.error("--messages must be at least --memories")
    return Options(
        messages=a.messages,
        memories=a.memories,
        partitions=a.partitions,
        batch=a.batch,
        threads=a.threads,
        repeat=a.repeat,
        seed=a.seed,
        redis_url=a.redis_url,
        timeout=a.timeout,
        resources=a.resources.resolve(),
        json=a.json,
        save=a.save,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    return finish(lambda: run(opts), render, save=opts.save, as_json=opts.json)


if __name__ == "__main__":
    sys.exit(main())
