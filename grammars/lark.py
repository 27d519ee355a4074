"""Lark grammars as token constraints.

    from constrain.grammars.lark import lark_grammar
    c = lark_grammar(open("grammars/json.lark").read())      # a GrammarConstraint
    m = c.compile(vocab).matcher()

The grammar text is loaded by `lark` itself (rules, EBNF operators, `?rule` inlining, templates, `%import
common.X`, `%ignore`, terminal flags), and its rules and terminals are lowered to our `GrammarIR`: terminals
become byte DFAs, rules feed the incremental Earley parser (`constrain.grammars.earley`).

The language is Lark's Earley parser with `lexer="dynamic_complete"`: a string is accepted iff it can be split
into lexemes, each fully matched by a terminal (ignored terminals allowed anywhere between lexemes), whose
terminal sequence the rules derive. Priorities only choose between parse trees in Lark, so they do not change
the language and are not needed here.
"""

from __future__ import annotations

import re
from importlib import resources

import lark
from lark.exceptions import LarkError

from constrain.errors import SpecError

from .cfg import GrammarConstraint
from .earley import GrammarIR, Rule, Terminal

_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE, "u": 0, "l": re.LOCALE}


def lark_to_ir(text: str, start: str = "start") -> GrammarIR:
    """Load Lark grammar `text` and lower it to a `GrammarIR` (start symbol `start`).

    Raises:
        SpecError: the grammar does not load (lark's message, with its line and column), names an unknown or
            declared-only terminal, or has a terminal that cannot be a byte DFA.
    """
    if not isinstance(text, str):
        raise SpecError(f"a Lark grammar must be text, got {type(text).__name__}")
    try:
        parser = lark.Lark(text, parser="earley", lexer="dynamic", start=start, keep_all_tokens=True)
    except LarkError as exc:
        raise SpecError(f"Lark grammar does not load: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - lark can raise re's (or regex's) errors and others on bad text
        raise SpecError(f"Lark grammar does not load: {type(exc).__name__}: {exc}") from exc
    terminals = []
    for t in parser.terminals:
        regexp = t.pattern.to_regexp()
        flags = 0
        for f in getattr(t.pattern, "flags", ()):
            flags |= _FLAGS.get(f, 0)
        terminals.append(Terminal(t.name, regexp, flags))
    rules = tuple(Rule(r.origin.name, tuple(s.name for s in r.expansion)) for r in parser.rules)
    known = {t.name for t in terminals}
    for r in rules:
        for s in r.rhs:
            if s.isupper() and s not in known and not any(s == q.lhs for q in rules):
                raise SpecError(
                    f"rule {r.lhs}: terminal {s} has no pattern (%declare'd terminals need a lexer)"
                )
    ignore = tuple(n for n in parser.ignore_tokens if n in known)
    return GrammarIR(terminals=tuple(terminals), rules=rules, start=start, ignore=ignore)


SHIPPED = ("json", "arithmetic", "sql_select", "python_call", "csv")


def shipped_grammar_text(name: str) -> str:
    """The text of a grammar shipped with the package (`SHIPPED`); raises `SpecError` for another name."""
    if name not in SHIPPED:
        raise SpecError(f"no shipped grammar {name!r}; the shipped ones are {', '.join(SHIPPED)}")
    return resources.files("constrain.grammars").joinpath(f"{name}.lark").read_text(encoding="utf-8")


def shipped_grammar(name: str) -> GrammarConstraint:
    """A shipped grammar (json, arithmetic, sql_select, python_call, csv) as a token constraint."""
    return lark_grammar(shipped_grammar_text(name), label=f"{name}.lark")


def lark_grammar(text: str, start: str = "start", *, label: str | None = None) -> GrammarConstraint:
    """A token constraint from Lark grammar `text` (see the module docstring for the language it defines).

    Raises `SpecError` (a `ConstraintError`) with the place for a malformed grammar; terminal patterns that
    no DFA can express raise `UnsupportedError`; oversized automata raise `CompileLimitError`. The grammar
    is fully checked here, not at first use.
    """
    ir = lark_to_ir(text, start)
    constraint = GrammarConstraint(ir, label=label or f"lark grammar ({len(ir.rules)} rules)")
    _ = constraint.core  # compile the vocabulary-independent part now, so errors surface at construction
    return constraint
