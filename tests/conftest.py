"""Shared fixtures: the real DeepSeek-V3 tokenizer and the sonnets tokenizer, compressed once per test session."""

from __future__ import annotations

import pytest
import torch

from engram import CompressedTokenizer

torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def deepseek(tmp_path_factory) -> CompressedTokenizer:
    """DeepSeek-V3 compression, built from scratch (private cache folder) once per session."""
    return CompressedTokenizer(cache_dir=tmp_path_factory.mktemp("engram-cache"))


@pytest.fixture(scope="session")
def compressor() -> CompressedTokenizer:
    """Compression of the 1,024-id BPE trained on the sonnets (tests.corpus), without a cache file."""
    from tests.corpus import sonnets_tokenizer

    return CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)
