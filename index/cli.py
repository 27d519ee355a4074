"""`constrain index ...`: build and inspect token-trie fact indexes.

    constrain index build facts.tsv -o kb/ --tokenizer smollm2     # TSV / CSV / JSONL triples
    constrain index build --source airports -o kb/ --tokenizer llama3
    constrain index stats kb/ [--verify] [--json]

`register(subparsers)` adds the `index` command to the main CLI's argparse subparsers; each handler returns
an exit status (0 ok; 2 for a `ConstraintError`, whose message is printed to stderr, as the main CLI does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from constrain.errors import ConstraintError

from .facts import DEFAULT_TEMPLATE, SOURCES, build_fact_index, read_triples, source_triples
from .trie import TrieIndex


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `index build` and `index stats` to an argparse subparsers object; returns the `index` parser."""
    parser = subparsers.add_parser(
        "index", help="build and inspect knowledge indexes (token trie over facts)"
    )
    commands = parser.add_subparsers(dest="index_command", metavar="{build,stats}")
    commands.required = True

    build = commands.add_parser("build", help="build a token trie from triples (subject, relation, object)")
    build.add_argument("facts", nargs="?", help="TSV, CSV or JSONL file of triples")
    build.add_argument("--source", choices=sorted(SOURCES), help="a shipped fact base instead of a file")
    build.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    build.add_argument(
        "--tokenizer", default="smollm2", help="tokenizer name (smollm2, llama3, qwen3, gpt2, ...)"
    )
    build.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help=f"verbalization (default {DEFAULT_TEMPLATE!r})"
    )
    build.add_argument(
        "--no-leading-space",
        action="store_true",
        help="tokenize facts as text that starts a string (default: as after a trigger, leading space)",
    )
    build.add_argument(
        "--format", choices=["tsv", "csv", "jsonl"], help="file format (default: from the suffix)"
    )
    build.add_argument("--force", action="store_true", help="replace an existing output folder")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=run_build)

    stats = commands.add_parser("stats", help="facts, nodes, bytes, bytes per fact and depth of an index")
    stats.add_argument("index", help="index folder")
    stats.add_argument("--verify", action="store_true", help="also check checksums and the whole structure")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=run_stats)
    return parser


def run_build(args: argparse.Namespace) -> int:
    """Handler of `constrain index build`."""
    try:
        if (args.facts is None) == (args.source is None):
            raise ConstraintError("give either a facts file or --source (not both)")
        if args.source is not None:
            triples = source_triples(args.source)
            origin = f"source:{args.source}"
        else:
            triples = read_triples(args.facts, fmt=args.format)
            origin = str(args.facts)
        started = time.perf_counter()
        index = build_fact_index(
            triples,
            args.out,
            tokenizer=args.tokenizer,
            template=args.template,
            leading_space=not args.no_leading_space,
            overwrite=args.force,
            progress=False if args.quiet else None,
            meta={"source": origin},
        )
        seconds = time.perf_counter() - started
    except ConstraintError as exc:
        print(f"constrain index build: error: {exc}", file=sys.stderr)
        return 2
    s = index.stats()
    print(
        f"built {s['path']}: {s['facts']:,} facts, {s['nodes']:,} nodes, {s['bytes']:,} bytes "
        f"({s['bytes_per_fact']:.1f} bytes/fact) in {seconds:.1f} s"
    )
    return 0


def run_stats(args: argparse.Namespace) -> int:
    """Handler of `constrain index stats`."""
    try:
        index = TrieIndex.load(args.index, verify=args.verify or None)
        if args.verify:
            index.verify()
    except ConstraintError as exc:
        print(f"constrain index stats: error: {exc}", file=sys.stderr)
        return 2
    s = index.stats()
    if args.json:
        print(json.dumps(s, indent=1, sort_keys=True))
        return 0
    meta = s["meta"]
    rows = [
        ("index", s["path"]),
        ("facts", f"{s['facts']:,}"),
        ("nodes", f"{s['nodes']:,} (path-compressed; {s['label_tokens']:,} label tokens)"),
        ("bytes", f"{s['bytes']:,} ({s['bytes_per_fact']:.1f} per fact, "
                  f"{s['bytes_vs_int32_tokens']:.2f}x the facts' int32 token ids)"),
        ("depth", f"max {s['max_depth']} tokens, mean {s['mean_depth']:.1f}"),
    ]  # fmt: skip
    rows += [
        (key, str(meta[key])) for key in ("tokenizer", "template", "leading_space", "source") if key in meta
    ]
    if args.verify:
        rows.append(("verify", "checksums and structure OK"))
    lines = [f"{label:<14}{value}" for label, value in rows]
    print("\n".join(lines))
    return 0
