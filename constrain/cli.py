"""The `constrain` command line.

    constrain generate --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}' "When did the Berlin Wall fall?"
    constrain generate "Is this review positive? 'Great phone.'" --choice positive negative
    constrain vocab llama3
    constrain demo

Errors in the input (a bad regex, an unknown model or vocabulary, bad sampling settings) print one line on
stderr and exit with status 2, without a traceback.

More subcommands plug in through `PLUGIN_MODULES`: each is a module with `register(subparsers)` that adds its
parsers (`subparsers.add_parser(...)`) and sets `parser.set_defaults(func=handler)`, where `handler(args)`
returns the exit status (None = 0). A plugin module that is not installed is skipped; one that fails to import
is reported on stderr and skipped, so the other commands keep working.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import ConstraintError

PLUGIN_MODULES: tuple[str, ...] = ("constrain.index.cli", "constrain.index.qa")
"""Modules whose `register(subparsers)` adds subcommands (e.g. `index ...`, `qa ...`); add more here."""


def _load_model(name: str, device: str) -> tuple[Any, Any]:
    """The model and tokenizer, quietly (the first SmolLM2 load still prints its own progress)."""
    import transformers

    from .assets import load_model

    transformers.logging.disable_progress_bar()
    try:
        model, tokenizer = load_model(name)
    except ConstraintError:
        raise
    except (OSError, ValueError) as error:  # not a transformers model folder, or an unreadable one
        raise ConstraintError(f"cannot load model {name!r}: {error}") from None
    if device != "cpu":
        model = model.to(device)
    return model, tokenizer


def _set_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads. On a machine whose cores are busy with other work, fewer threads
    can be much faster (spinning OpenMP workers wait for cores they do not get)."""
    if threads is None:
        return
    if threads < 1:
        raise ConstraintError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _read_spec_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConstraintError(f"cannot read the {what} file {path!r}: {exc.strerror}") from exc


def _constraint(args: argparse.Namespace) -> Any:
    given = [
        name
        for name, value in (
            ("--regex", args.regex),
            ("--choice", args.choice),
            ("--json-schema", args.json_schema),
            ("--grammar", args.grammar),
        )
        if value
    ]
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(given)}")
    if args.json_schema:
        import json

        from .grammars.json_schema import json_schema

        text = _read_spec_file(args.json_schema, "JSON schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConstraintError(
                f"{args.json_schema}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}"
            ) from exc
        return json_schema(schema)
    if args.grammar:
        from .grammars.lark import lark_grammar

        return lark_grammar(_read_spec_file(args.grammar, "grammar"), label=args.grammar)
    if args.regex is None and not args.choice:
        return None
    from .grammars.regex import choice, regex

    return regex(args.regex) if args.regex is not None else choice(args.choice)


def cmd_generate(args: argparse.Namespace) -> int:
    """`constrain generate`: constrained generation for one or more prompts; prints each output on a line."""
    from .generate import generate, model_vocabulary

    if not args.prompts:
        raise ConstraintError(
            'no prompt given: put it before --choice (constrain generate "PROMPT" --choice A B) '
            'or after `--` (constrain generate --choice A B -- "PROMPT")'
        )
    if args.stream and len(args.prompts) > 1:
        raise ConstraintError("--stream takes a single prompt")
    _set_threads(args.threads)
    constraint = _constraint(args)  # before loading the model: a bad regex fails fast
    model, tokenizer = _load_model(args.model, args.device)
    vocab = model_vocabulary(model, tokenizer)
    if constraint is not None:
        start = time.perf_counter()
        constraint = constraint.compile(vocab)
        compile_s = time.perf_counter() - start
    start = time.perf_counter()

    def stream(row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generations = generate(
        model,
        tokenizer,
        list(args.prompts),
        constraint,
        vocab=vocab,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        chat=False if args.no_chat else None,
        stream=stream if args.stream else None,
    )
    elapsed = time.perf_counter() - start
    for g in generations:
        if args.stream:
            sys.stdout.write("\n")
        else:
            print(g.text)
    if args.verbose:
        for i, g in enumerate(generations):
            print(
                f"[{i}] {g.finish_reason}, {len(g.token_ids)} tokens, prompt {g.prompt_tokens} tokens",
                file=sys.stderr,
            )
        extra = f", compile {compile_s * 1e3:.1f} ms" if constraint is not None else ""
        print(f"generated in {elapsed:.2f} s{extra}", file=sys.stderr)
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    """`constrain vocab NAME`: sizes, specials, EOS ids and trie size of a vocabulary."""
    from .assets import load_vocabulary

    vocab = load_vocabulary(args.name)
    lengths = [len(vocab.token_bytes[int(i)]) for i in vocab.ordinary_ids]
    single = {vocab.token_bytes[int(i)][0] for i in vocab.ordinary_ids if len(vocab.token_bytes[int(i)]) == 1}
    trie = vocab.trie
    rows = [
        ("name", vocab.name),
        ("tokens", f"{vocab.n_tokens:,}"),
        ("logits width", f"{vocab.vocab_size:,}"),
        ("ordinary tokens", f"{len(vocab.ordinary_ids):,}"),
        ("special tokens", f"{len(vocab.special_ids):,}"),
        (
            "EOS",
            ", ".join(
                f"{i} {vocab.token_bytes[i].decode(errors='replace')!r}" for i in sorted(vocab.eos_ids)
            ),
        ),
        ("longest token", f"{max(lengths)} bytes"),
        ("mean token", f"{sum(lengths) / len(lengths):.2f} bytes"),
        ("single-byte tokens", f"{len(single)} of 256"),
        ("trie nodes", f"{trie.n_nodes:,}"),
        ("fingerprint", vocab.fingerprint),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    specials = sorted(vocab.special_ids)
    if specials and args.specials:
        print("specials:")
        for i in specials:
            print(f"  {i:>7}  {vocab.token_bytes[i].decode(errors='replace')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`constrain demo`: the demo of constrained vs unconstrained generation."""
    from .demo import main as demo_main

    _set_threads(args.threads)
    return demo_main(max_new_tokens=args.max_new_tokens, qa=not args.no_qa)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every built-in subcommand and the plugins' (see `PLUGIN_MODULES`)."""
    parser = argparse.ArgumentParser(
        prog="constrain",
        description="Constrained decoding for LLMs: regex / grammar / JSON-schema / index constraints as "
        "token masks. `constrain COMMAND --help` documents each command.",
        epilog="examples:\n"
        "  constrain generate --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}' \"When did the Berlin Wall fall?\"\n"
        "  constrain generate \"Is this review positive? 'Great phone.'\" --choice yes no\n"
        "  constrain vocab llama3\n"
        "  constrain demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate text under a regex, a choice of strings, a JSON schema or a Lark grammar",
        description="Generate with a model (default: the shipped SmolLM2-135M-Instruct, offline), "
        "constrained by --regex, --choice, --json-schema or --grammar; prints one output per prompt.",
        epilog="With --choice, give the prompt first or after --: "
        'constrain generate "Sentiment of: I love it" --choice positive negative',
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (several make a batch)")
    gen.add_argument("--model", default="smollm2", help="'smollm2' (default) or a local transformers folder")
    gen.add_argument("--regex", metavar="PATTERN", help="the output must fullmatch this Python regex")
    gen.add_argument(
        "--choice", nargs="+", action="extend", metavar="OPTION", help="the output is one of these"
    )
    gen.add_argument(
        "--json-schema", metavar="FILE", help="the output is JSON valid under this JSON Schema file"
    )
    gen.add_argument("--grammar", metavar="FILE", help="the output parses under this Lark grammar file")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens generated (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    gen.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min_p x the top one (0 = off)"
    )
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    gen.add_argument("-v", "--verbose", action="store_true", help="print finish reasons and timing on stderr")
    gen.set_defaults(func=cmd_generate)

    voc = sub.add_parser(
        "vocab",
        help="statistics of a vocabulary",
        description="Sizes, special tokens, EOS ids and the byte-trie size of a vocabulary.",
    )
    voc.add_argument("name", help="smollm2, llama3, qwen3, gpt2, mistral-sp, or a tokenizer folder")
    voc.add_argument("--specials", action="store_true", help="also list the special tokens")
    voc.set_defaults(func=cmd_vocab)

    demo = sub.add_parser(
        "demo",
        help="constrained vs unconstrained generation side by side (SmolLM2, offline)",
        description="Runs SmolLM2-135M-Instruct on a few prompts with and without a constraint and shows "
        "which outputs match their regex; then answers questions with and without a fact index, marking "
        "which stated facts are true (in the index).",
    )
    demo.add_argument("--no-qa", action="store_true", help="skip the knowledge-grounded QA part")
    demo.add_argument("--max-new-tokens", type=int, default=32, help="per output (default 32)")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: where the cores are shared, more threads can be much slower)",
    )
    demo.set_defaults(func=cmd_demo)

    for name in PLUGIN_MODULES:
        register = _plugin(name)
        if register is not None:
            register(sub)
    return parser


def _plugin(name: str) -> Any:
    """The `register` function of a plugin module, or None if the module is not installed."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and name.startswith(error.name):
            return None  # the plugin (or its package) is not there: nothing to add
        print(f"constrain: skipping the commands of {name}: {error}", file=sys.stderr)
        return None
    except ImportError as error:
        print(f"constrain: skipping the commands of {name}: {error}", file=sys.stderr)
        return None
    register = getattr(module, "register", None)
    if register is None:
        print(f"constrain: {name} has no register(subparsers); skipped", file=sys.stderr)
    return register


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except ConstraintError as error:
        print(f"constrain {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
