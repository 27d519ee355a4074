"""Knowledge-grounded question answering: the model writes "Fact: ..." lines, and every fact it writes comes
from a fact base (a token trie), then answers.

    model, tokenizer = constrain.assets.load_model("smollm2")
    a = answer("Which country is the airport LHR in?", "kb/", model, tokenizer)
    a.text     # 'Fact: LHR is the IATA code of London Heathrow Airport.\\nFact: ...\\nAnswer: United Kingdom'
    a.facts    # [StatedFact('LHR is the IATA code of London Heathrow Airport.', in_base=True, ...), ...]

The flow (docs/qa.md): a chat prompt (a system prompt that asks for "Fact:" lines then "Answer:", and a
one-shot example) ends with the assistant turn already opened with "Fact:", so the answer starts with a fact.
Decoding runs under trigger mode (`constrain.index.triggers`): free text, except that after each "Fact:" the
token trie takes over until a whole fact of the base is written; `no_repeat` keeps a fact from being written
twice. The stated facts are then read back from the text and checked against the base (`FactChecker`: the
fact's text is tokenized as the index was built and looked up in the trie), so the constrained and the
unconstrained run are judged by the same parser and the same check.

`register_qa(subparsers)` adds `constrain qa`; `qa_demo()` runs the side-by-side demo on airports/countries.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from constrain.errors import ConstraintError

from .trie import ROOT, TrieIndex, TrieStore, trie_constraint
from .triggers import TriggeredSpan, trigger_mode

TRIGGER = "Fact:"
SYSTEM_PROMPT = (
    "You answer questions with facts. First write the facts you need, one per line, each line starting with "
    "'Fact:'. Then write 'Answer:' and a short answer."
)
EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Which country is the airport MAD in?",
        "Fact: MAD is the IATA code of Madrid Barajas International Airport.\n"
        "Fact: Madrid Barajas International Airport is located in the country Spain.\n"
        "Answer: Spain",
    ),
)
"""One-shot example(s) shown as earlier chat turns: (question, answer in the expected format)."""


# ======================================================================================================
# results
# ======================================================================================================
@dataclass(frozen=True)
class StatedFact:
    """A fact the answer states after a "Fact:" trigger.

    `text`: the fact as written (without the trigger and surrounding spaces; if the line goes on after the
    fact, the fact part). `in_base`: the fact base holds exactly this fact. `complete`: False if the text was
    cut off inside this fact (by the token limit); such a fact is neither true nor false.
    """

    text: str
    in_base: bool
    complete: bool = True


@dataclass
class Answer:
    """One answer: the question, the full text (starting with the prefilled trigger), the text after
    "Answer:", the stated facts with their check, whether decoding was constrained, how it ended, and (when
    constrained) the spans the trie constrained."""

    question: str
    text: str
    answer: str
    facts: list[StatedFact]
    constrained: bool
    finish_reason: str
    new_tokens: int
    spans: list[TriggeredSpan] = field(default_factory=list)

    @property
    def stated(self) -> list[StatedFact]:
        """The complete stated facts (cut-off ones excluded)."""
        return [f for f in self.facts if f.complete]

    @property
    def all_in_base(self) -> bool:
        """True if every complete stated fact is in the base."""
        return all(f.in_base for f in self.stated)


# ======================================================================================================
# checking facts against the base
# ======================================================================================================
class FactChecker:
    """Is a fact text in the base? Tokenizes it as the index was built (" " + text, unless the index says
    `leading_space: false`) and walks the trie: exact, since a fact's stored tokens are its text's canonical
    tokenization (`constrain.index.facts.encode_fact_texts` checks that at build time)."""

    def __init__(self, store: TrieStore, tokenizer: Any):
        self.store = store
        self.tokenizer = tokenizer
        meta = getattr(store, "meta", {}) or {}
        self.leading_space = bool(meta.get("leading_space", True))

    def tokens(self, text: str) -> list[int]:
        """The token ids the base would store for the fact `text`."""
        target = (" " + text) if self.leading_space else text
        return list(self.tokenizer(target, add_special_tokens=False)["input_ids"])

    def __call__(self, text: str) -> bool:
        """True if the base holds the fact `text` exactly."""
        if not text:
            return False
        node = ROOT
        for token in self.tokens(text):
            node = self.store.child(node, int(token))
            if node < 0:
                return False
        return self.store.is_terminal(node)


_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def parse_facts(
    text: str, in_base: Callable[[str], bool], *, trigger: str = TRIGGER, cut_off: bool = False
) -> list[StatedFact]:
    """The facts stated in `text`: what follows each `trigger`, up to the end of its line (or the next
    trigger). If the line goes on after a fact, the fact is the shortest prefix ending in "." that `in_base`
    accepts, else the line up to its first sentence end ("." then a space or the end). `cut_off=True` (the
    text was cut by the token limit) marks a fact on the unterminated last line as incomplete unless it is in
    the base."""
    facts = []
    pos = 0
    while (i := text.find(trigger, pos)) >= 0:
        start = i + len(trigger)
        newline = text.find("\n", start)
        end = len(text) if newline < 0 else newline
        following = text.find(trigger, start)
        if 0 <= following < end:
            end = following
        line = text[start:end].strip()
        fact, ok = None, False
        candidates = [line[: m.end()] for m in re.finditer(r"\.", line)] + [line]
        for candidate in candidates:
            if in_base(candidate):
                fact, ok = candidate, True
                break
        if fact is None:
            first = _SENTENCE_END.search(line)
            fact = line[: first.end()] if first else line
        last_line = newline < 0 and following < 0
        facts.append(StatedFact(fact, ok, complete=ok or not (cut_off and last_line)))
        pos = end
    return facts


def _answer_line(text: str) -> str:
    found = text.rfind("Answer:")
    if found < 0:
        return ""
    return text[found + len("Answer:") :].split("\n", 1)[0].strip()


# ======================================================================================================
# prompting and decoding
# ======================================================================================================
def build_prompt(
    tokenizer: Any,
    question: str,
    *,
    system: str = SYSTEM_PROMPT,
    examples: Sequence[tuple[str, str]] = EXAMPLES,
    prefill: str = TRIGGER,
) -> list[int]:
    """Token ids of the chat prompt: system prompt, example turns, the question, and the assistant turn
    opened with `prefill`. Raises `ConstraintError` if the tokenizer has no chat template or the question is
    empty."""
    if not isinstance(question, str) or not question.strip():
        raise ConstraintError("the question is empty")
    if not getattr(tokenizer, "chat_template", None):
        raise ConstraintError("the tokenizer has no chat template: QA needs a chat model")
    messages = [{"role": "system", "content": system}]
    for q, a in examples:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question.strip()})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _open_store(index: TrieStore | str | os.PathLike) -> TrieStore:
    from .postgres import open_trie_store

    return open_trie_store(index)


def answer_batch(
    questions: Sequence[str],
    index: TrieStore | str | os.PathLike,
    model: Any,
    tokenizer: Any,
    *,
    constrained: bool | Sequence[bool] = True,
    max_new_tokens: int = 64,
    trigger: str = TRIGGER,
    no_repeat: bool = True,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    seed: int | None = None,
    system: str = SYSTEM_PROMPT,
    examples: Sequence[tuple[str, str]] = EXAMPLES,
    fact_check: Callable[[str], bool] | None = None,
) -> list[Answer]:
    """Answer several questions in one batch; `constrained` is one flag for all or one per question.

    `index`: a `TrieIndex`, any `TrieStore`, an index folder or a postgresql:// URL. Constrained rows decode
    under `trigger_mode({trigger: trie_constraint(index, no_repeat=no_repeat)}, stop=stop)`, starting inside
    the first fact (the prompt ends with the trigger). Facts are checked with `fact_check` (default: a
    `FactChecker` on the index). Raises `ConstraintError` for an empty question, a tokenizer without a chat
    template, an index built for another vocabulary, or bad decoding arguments.
    """
    from constrain.generate import generate, model_vocabulary

    store = _open_store(index)
    vocab = model_vocabulary(model, tokenizer)
    meta = getattr(store, "meta", {}) or {}
    fingerprint = meta.get("vocab_fingerprint")
    if fingerprint is not None and fingerprint != vocab.fingerprint:
        raise ConstraintError(
            f"the index {store!r} was built for another vocabulary ({meta.get('vocab_name', '?')!r}) than "
            f"the model's ({vocab.name!r}); rebuild it with the model's tokenizer"
        )
    questions = list(questions)
    flags = [constrained] * len(questions) if isinstance(constrained, bool) else list(constrained)
    if len(flags) != len(questions):
        raise ConstraintError(f"constrained: {len(flags)} flags for {len(questions)} questions")
    if trigger != TRIGGER:  # the default prompt and example speak of "Fact:": use the caller's trigger
        system = SYSTEM_PROMPT.replace(TRIGGER, trigger) if system is SYSTEM_PROMPT else system
        if examples is EXAMPLES:
            examples = tuple((q, a.replace(TRIGGER, trigger)) for q, a in EXAMPLES)
    leading_space = bool(meta.get("leading_space", True))
    # Facts stored without a leading space start right after the trigger's own space.
    phrase = trigger if leading_space else trigger + " "
    prompts = [
        build_prompt(tokenizer, q, system=system, examples=examples, prefill=phrase) for q in questions
    ]
    compiled = None
    if any(flags):
        spec = trigger_mode({phrase: trie_constraint(store, no_repeat=no_repeat)}, stop=list(stop))
        compiled = spec.compile(vocab)
    matchers = [compiled.matcher(phrase) if flag else None for flag in flags]
    outputs = generate(
        model,
        tokenizer,
        prompts,
        matchers,
        vocab=vocab,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    check = fact_check or FactChecker(store, tokenizer)
    answers = []
    for question, flag, matcher, out in zip(questions, flags, matchers, outputs, strict=True):
        text = phrase + out.text
        answers.append(
            Answer(
                question=question,
                text=text,
                answer=_answer_line(text),
                facts=parse_facts(text, check, trigger=trigger, cut_off=out.finish_reason == "length"),
                constrained=flag,
                finish_reason=out.finish_reason,
                new_tokens=len(out.token_ids),
                spans=matcher.spans() if matcher is not None else [],
            )
        )
    return answers


def answer(
    question: str,
    index: TrieStore | str | os.PathLike,
    model: Any,
    tokenizer: Any,
    *,
    constrained: bool = True,
    **options: Any,
) -> Answer:
    """Answer one question (see `answer_batch` for the options and errors)."""
    return answer_batch([question], index, model, tokenizer, constrained=constrained, **options)[0]


# ======================================================================================================
# the demo
# ======================================================================================================
DEMO_AIRPORTS = ("LHR", "CDG", "JFK", "HND", "SYD", "FRA", "AMS", "DXB", "SFO", "MAD", "FCO", "YYZ")
DEMO_QUESTIONS = (
    "Which country is the airport LHR in?",
    "What is the capital of Australia?",
    "In which city is the airport JFK?",
    "What currency does Japan use?",
)
_DEMO_VERSION = 1


def demo_triples() -> list[Any]:
    """The demo's fact base: every fact about the demo airports (LHR, CDG, JFK ...), every 100th other airport
    as distractors, and all countries (capitals, currencies, languages, neighbours ...)."""
    import airportsdata

    from .facts import airport_triples, country_triples

    airports = airportsdata.load("IATA")
    wanted = {airports[code]["name"].strip() for code in DEMO_AIRPORTS}
    others = sorted(a["name"].strip() for a in airportsdata.load("ICAO").values() if a["name"].strip())
    wanted |= set(others[::100])
    triples = [t for t in airport_triples() if t.subject in wanted or t.object in wanted]
    return triples + list(country_triples())


def demo_index(tokenizer_name: str = "smollm2") -> TrieIndex:
    """The demo's index, built once and cached under `$CONSTRAIN_CACHE` (a new folder if the base changes)."""
    from constrain.assets import cache_dir

    from .facts import build_fact_index

    key = hashlib.sha256(f"{_DEMO_VERSION}|{tokenizer_name}|{DEMO_AIRPORTS}".encode()).hexdigest()[:12]
    folder = cache_dir() / f"qa-demo-{tokenizer_name}-{key}"
    if (folder / "header.json").exists():
        return TrieIndex.load(folder)
    meta = {"source": "constrain qa demo"}
    return build_fact_index(demo_triples(), folder, tokenizer=tokenizer_name, progress=False, meta=meta)


def _fact_texts(index: TrieIndex, vocab: Any) -> set[str]:
    """Every fact of the index as text (decoded from its tokens; leading space removed)."""
    return {vocab.decode(fact).strip() for fact in index.facts()}


def qa_demo(
    *,
    max_new_tokens: int = 64,
    threads: int | None = 1,
    questions: Sequence[str] = DEMO_QUESTIONS,
    out: TextIO | None = None,
) -> int:
    """The QA demo: SmolLM2-135M-Instruct answers `questions` on the airports/countries base, once under the
    trie (trigger mode) and once unconstrained, in one batch; each stated fact is marked in-base or not by
    looking it up in the set of the base's fact texts. Prints the report; returns 0."""
    import torch

    from constrain.assets import load_model
    from constrain.generate import model_vocabulary

    out = out or sys.stdout
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    vocab = model_vocabulary(model, tokenizer)
    loaded = time.perf_counter()
    index = demo_index("smollm2")
    texts = _fact_texts(index, vocab)
    built = time.perf_counter()
    questions = list(questions)
    answers = answer_batch(
        questions + questions,
        index,
        model,
        tokenizer,
        constrained=[True] * len(questions) + [False] * len(questions),
        max_new_tokens=max_new_tokens,
        fact_check=texts.__contains__,
    )
    done = time.perf_counter()
    n = len(questions)
    print(
        f"constrain qa demo: SmolLM2-135M-Instruct, greedy, {max_new_tokens} new tokens at most; fact base: "
        f"{index.n_facts:,} facts (airports, countries). [in base] = the text is one of the base's facts.\n",
        file=out,
    )
    totals = {True: [0, 0], False: [0, 0]}
    for question, with_trie, without in zip(questions, answers[:n], answers[n:], strict=True):
        print(f"== {question}", file=out)
        for label, a in (("constrained (trigger mode + trie)", with_trie), ("unconstrained", without)):
            print(f"   {label}: [{a.finish_reason}, {a.new_tokens} tokens]", file=out)
            for f in a.facts:
                mark = (
                    "[in base]    " if f.in_base else ("[cut off]    " if not f.complete else "[NOT in base]")
                )
                print(f"     {mark} {f.text}", file=out)
                if f.complete:
                    totals[a.constrained][0] += f.in_base
                    totals[a.constrained][1] += 1
            print(f"     answer: {a.answer or '(none)'}", file=out)
        print(file=out)
    (ok_c, n_c), (ok_u, n_u) = totals[True], totals[False]
    print(
        f"Stated facts in the base: constrained {ok_c}/{n_c}, unconstrained {ok_u}/{n_u}. Model load "
        f"{loaded - started:.1f} s, index {built - loaded:.1f} s, generation {done - built:.1f} s for "
        f"{2 * n} rows ({sum(a.new_tokens for a in answers)} tokens).",
        file=out,
    )
    return 0


# ======================================================================================================
# the command line
# ======================================================================================================
def register_qa(subparsers: Any) -> argparse.ArgumentParser:
    """Add `constrain qa` to an argparse subparsers object; returns its parser (handler: `run_qa`)."""
    parser = subparsers.add_parser(
        "qa",
        help="answer a question with facts from a fact base (trie-constrained 'Fact:' lines)",
        description="Answer a question with SmolLM2 (or a local chat model): the answer lists 'Fact:' lines, "
        "each constrained to a fact of the index, then 'Answer:'. Each stated fact is checked against the "
        "index. Without --index, runs the airports/countries demo.",
        epilog='example: constrain qa --index kb/ "Which country is the airport LHR in?"',
    )
    parser.add_argument("question", nargs="*", help="the question (several words are joined)")
    parser.add_argument("--index", help="index folder (constrain index build) or postgresql:// URL")
    parser.add_argument(
        "--model", default="smollm2", help="'smollm2' (default) or a local transformers folder"
    )
    parser.add_argument(
        "--no-constraint",
        action="store_true",
        help="decode without the trie (to compare with the constrained run)",
    )
    parser.add_argument("--compare", action="store_true", help="run both, constrained and unconstrained")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="the most tokens generated (default 64)"
    )
    parser.add_argument(
        "--trigger", default=TRIGGER, help=f"the phrase that starts a fact (default {TRIGGER!r})"
    )
    parser.add_argument("--allow-repeats", action="store_true", help="let the same fact be stated twice")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; more can be slower on shared cores)",
    )
    parser.set_defaults(func=run_qa)
    return parser


def run_qa(args: argparse.Namespace) -> int:
    """Handler of `constrain qa`; returns the exit status (2 for a `ConstraintError`, printed on stderr)."""
    try:
        if args.index is None:
            if args.question:
                raise ConstraintError("give --index (a folder or postgresql:// URL) to ask your own question")
            return qa_demo(max_new_tokens=args.max_new_tokens, threads=args.threads)
        return _run_question(args)
    except ConstraintError as exc:
        print(f"constrain qa: error: {exc}", file=sys.stderr)
        return 2


def _run_question(args: argparse.Namespace) -> int:
    import torch

    question = " ".join(args.question).strip()
    if not question:
        raise ConstraintError('no question given: constrain qa --index kb/ "Which country is LHR in?"')
    if args.threads is not None:
        if args.threads < 1:
            raise ConstraintError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    store = _open_store(args.index)  # before the model: a bad index fails fast
    from constrain.cli import _load_model

    model, tokenizer = _load_model(args.model, "cpu")
    flags = [True, False] if args.compare else [not args.no_constraint]
    started = time.perf_counter()
    answers = answer_batch(
        [question] * len(flags),
        store,
        model,
        tokenizer,
        constrained=flags,
        max_new_tokens=args.max_new_tokens,
        trigger=args.trigger,
        no_repeat=not args.allow_repeats,
        temperature=args.temperature,
        seed=args.seed,
    )
    seconds = time.perf_counter() - started
    for a in answers:
        if len(answers) > 1:
            print(f"== {'constrained' if a.constrained else 'unconstrained'}")
        print(a.text.rstrip())
        print()
        n_in = sum(f.in_base for f in a.stated)
        print(f"facts: {len(a.stated)} stated, {n_in} in the base [{a.finish_reason}, {a.new_tokens} tokens]")
        for f in a.facts:
            mark = "in base    " if f.in_base else ("cut off    " if not f.complete else "NOT in base")
            print(f"  [{mark}] {f.text}")
        print()
    print(f"generated in {seconds:.1f} s", file=sys.stderr)
    return 0


register = register_qa  # the name constrain.cli's PLUGIN_MODULES looks for

__all__ = [
    "EXAMPLES",
    "SYSTEM_PROMPT",
    "TRIGGER",
    "Answer",
    "FactChecker",
    "StatedFact",
    "answer",
    "answer_batch",
    "build_prompt",
    "demo_index",
    "parse_facts",
    "qa_demo",
    "register",
    "register_qa",
    "run_qa",
]
