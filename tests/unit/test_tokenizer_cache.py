"""The tokenizer cache filled by several workers at once (``memstream run`` processes
starting together on one machine share it)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from processors.tokenizers import ENCODINGS, prepare_cache


def test_workers_filling_the_tokenizer_cache_together_all_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "tiktoken"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    workers = 6
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def fill() -> None:
        barrier.wait()
        try:
            prepare_cache()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=fill) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(list(cache.iterdir())) == len(ENCODINGS), "a partial file was left behind"
    prepare_cache()  # and the complete files are found again
