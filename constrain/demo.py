"""`constrain demo` / `make demo`: the shipped SmolLM2-135M-Instruct with and without constraints.

Each example runs the same prompt twice in one batch, once under its constraint and once unconstrained, and
prints both with whether they fullmatch the example's regex (`re.fullmatch`, Python's own engine: an oracle
independent of ours). Everything loads offline; on 2 CPU cores it takes well under a minute once the model
is cached.
"""

from __future__ import annotations

import re
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any

from .generate import generate, model_vocabulary


@dataclass(frozen=True)
class Example:
    """A prompt, the regex its answer must fullmatch, and how to build the constraint (regex or choice)."""

    title: str
    prompt: str
    pattern: str
    options: tuple[str, ...] = ()

    def constraint(self):
        from .grammars.regex import choice, regex

        return choice(list(self.options)) if self.options else regex(self.pattern)

    def describe(self) -> str:
        return f"choice {list(self.options)}" if self.options else f"regex {self.pattern}"


SENTIMENTS = ("positive", "negative", "neutral")

EXAMPLES = (
    Example(
        "ISO date",
        "When did the Berlin Wall fall? Give the date as YYYY-MM-DD.",
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    ),
    Example(
        "sentiment label",
        "What is the sentiment of this review: 'The battery died after two days and support never answered.'",
        "|".join(SENTIMENTS),
        SENTIMENTS,
    ),
    Example(
        "e-mail address",
        "Write the e-mail address of John Smith, who works at Acme Corporation.",
        r"[a-z0-9._]{1,24}@[a-z0-9-]{1,20}\.(com|org|net)",
    ),
    Example(
        "US phone number",
        "Give a phone number for a pizza restaurant in New York.",
        r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
    ),
    Example(
        "key=value record",
        "Describe the Eiffel Tower: its city, its country and its height in metres.",
        r"city=[A-Z][a-z]+; country=[A-Z][a-z]+; height_m=[0-9]{2,4}",
    ),
    Example(
        "yes / no",
        "Is the Pacific the largest ocean on Earth? Answer yes or no.",
        "yes|no",
        ("yes", "no"),
    ),
)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return textwrap.shorten(flat, width=width, placeholder=" ...") if flat else "(empty)"


def main(max_new_tokens: int = 32, out=None, *, qa: bool = True) -> int:
    """Load SmolLM2 offline, run every example constrained and unconstrained, print a report; then (with `qa`)
    the knowledge-grounded QA demo, where facts must come from a fact index. Returns 0."""
    from .assets import load_model

    out = out or sys.stdout
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    vocab = model_vocabulary(model, tokenizer)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    constraints = [example.constraint().compile(vocab) for example in EXAMPLES]
    compiled = time.perf_counter() - start
    prompts = [example.prompt for example in EXAMPLES]
    start = time.perf_counter()
    # One batch: the constrained rows first, then the same prompts unconstrained.
    generations = generate(
        model,
        tokenizer,
        prompts + prompts,
        constraints + [None] * len(prompts),
        max_new_tokens=max_new_tokens,
    )
    elapsed = time.perf_counter() - start
    n = len(EXAMPLES)
    matched = 0
    print("constrain demo: SmolLM2-135M-Instruct, greedy, chat template; 'match' = re.fullmatch\n", file=out)
    for example, constrained, free in zip(EXAMPLES, generations[:n], generations[n:], strict=True):
        ok = re.fullmatch(example.pattern, constrained.text) is not None
        free_ok = re.fullmatch(example.pattern, free.text.strip()) is not None
        matched += ok
        print(f"== {example.title}: {example.describe()}", file=out)
        print(f"   prompt        {example.prompt}", file=out)
        print(
            f"   constrained   {constrained.text!r}  [{'match' if ok else 'NO MATCH'}, "
            f"{constrained.finish_reason}, {len(constrained.token_ids)} tokens]",
            file=out,
        )
        print(
            f"   unconstrained {_one_line(free.text, 72)!r}  [{'match' if free_ok else 'no match'}, "
            f"{free.finish_reason}, {len(free.token_ids)} tokens]\n",
            file=out,
        )
    print(
        f"{matched}/{n} constrained outputs match their regex. Model load {loaded:.1f} s, compile "
        f"{compiled * 1e3:.0f} ms, generation {elapsed:.1f} s for {2 * n} rows "
        f"({sum(len(g.token_ids) for g in generations)} tokens).",
        file=out,
    )
    print("\n== a pydantic model filled by the model (json_schema(City), parsed and validated)", file=out)
    pydantic_demo(model, tokenizer, vocab, out=out)
    if qa:
        from .index.qa import qa_demo

        print(
            "\n== knowledge-grounded QA: 'Fact:' lines must be facts of the airports/countries base", file=out
        )
        qa_demo(out=out)
    return 0


def pydantic_demo(model: Any, tokenizer: Any, vocab: Any, out: Any = None, max_new_tokens: int = 80) -> Any:
    """Fill the `City` pydantic model with SmolLM2 under `json_schema(City)` and print the validated instance
    (and the unconstrained answer beside it). Returns the `City`."""
    from pydantic import BaseModel, Field

    from .grammars.json_schema import json_schema

    class City(BaseModel):
        name: str = Field(max_length=40)
        country: str = Field(max_length=40)
        population: int = Field(ge=0)
        is_capital: bool

    out = out or sys.stdout
    constraint = json_schema(City, whitespace="compact")
    prompt = "Describe the city of Paris as a JSON object with its name, country, population and is_capital."
    start = time.perf_counter()
    constrained, free = generate(
        model, tokenizer, [prompt, prompt], [constraint, None], max_new_tokens=max_new_tokens, vocab=vocab
    )
    elapsed = time.perf_counter() - start
    city = constraint.parse(constrained.text)
    print(f"   prompt        {prompt}", file=out)
    print(f"   constrained   {constrained.text!r}  [{constrained.finish_reason}]", file=out)
    print(f"   parsed        {city!r}", file=out)
    print(f"   unconstrained {_one_line(free.text, 72)!r}", file=out)
    print(f"   ({elapsed:.1f} s for both rows)", file=out)
    return city


if __name__ == "__main__":
    sys.exit(main())
