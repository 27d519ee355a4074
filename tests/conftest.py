"""Shared fixtures: real tokenizers and vocabularies, loaded offline and cached per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Converted tokenizers and model weights live in the checkout's git-ignored .cache unless told otherwise.
os.environ.setdefault("CONSTRAIN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without CUDA, tests/test_triton_sampling.py runs the fused kernels through Triton's CPU interpreter, which
# is chosen when triton is first imported: set it here, before any test module can import triton.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REAL_VOCABS = ("smollm2", "llama3", "qwen3", "gpt2", "mistral-sp")


@pytest.fixture(scope="session")
def tokenizers():
    """A function name -> transformers tokenizer (cached)."""
    from constrain.assets import load_tokenizer

    return load_tokenizer


@pytest.fixture(scope="session")
def vocabularies():
    """A function name -> Vocabulary (cached)."""
    from constrain.assets import load_vocabulary

    return load_vocabulary


def pytest_configure(config):
    # One torch thread: the suite's models are small, the mask-filling worker thread needs a core, and on a
    # shared 2-core machine OpenMP spinning costs more than it gains. CONSTRAIN_TEST_THREADS overrides.
    import torch

    torch.set_num_threads(int(os.environ.get("CONSTRAIN_TEST_THREADS", "1")))
