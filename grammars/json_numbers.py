"""Exact automata for JSON numbers under `multipleOf` and decimal (non-integer) bounds.

Schema numbers are read as the decimals they were written as (`Fraction(repr(float))`: the shortest
spelling, which is the schema text's for up to 17 significant digits), and instances are compared exactly,
as the JSON Schema specification says: 0.07 is a multiple of 0.01 (Python's float division says it is not).

Number spellings here have no exponent: `-?(0|[1-9][0-9]*)(\\.[0-9]+)?`. The caller decides which exponent
spellings it also admits (the lowering refuses them under `multipleOf`: a completeness gap, never a
soundness one).

- `cmp_regex(op, bound)`: a regex of the non-negative spellings whose value compares to `bound` (>= 0).
- `lower_bound_regex` / `upper_bound_regex`: all exponent-free spellings (both signs) with value >= / > lo
  or <= / < hi.
- `multiple_dfa(step)`: the spellings whose value is an integer multiple of `step` (a residue automaton:
  reading digit d takes residue r to (10 r + d) mod K).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .dfa import ByteDFA, minimize

NONNEG = r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?"
MAX_MULTIPLE_STATES = 200_000  # residue automaton rows before minimisation (13 classes each)


def exact(value: object) -> Fraction:
    """The exact decimal a schema number stands for (floats by their shortest repr).

    Raises:
        TypeError: not a number (booleans included).
        ValueError: not finite.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise TypeError(f"not a number: {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not finite: {value!r}")
        return Fraction(repr(value))
    return Fraction(value)


def _split(bound: Fraction) -> tuple[int, str]:
    """A non-negative decimal as (integer part, fraction digits without trailing zeros).

    Raises:
        ValueError: `bound` has no finite decimal expansion.
    """
    whole = bound.numerator // bound.denominator
    rest = bound - whole
    digits = ""
    while rest:
        if len(digits) > 400:
            raise ValueError(f"{bound} has no short decimal expansion")
        rest *= 10
        d = rest.numerator // rest.denominator
        digits += str(d)
        rest -= d
    return whole, digits


def _digits(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"[{lo}-{hi}]"


def _frac_regex(op: str, d: str) -> str | None:
    """A regex for fraction digit strings F (non-empty) with 0.F `op` 0.d (d has no trailing zeros); None if
    none."""
    alts = []
    if op in (">", ">="):
        for i, c in enumerate(d):  # F and d first differ at i, F's digit larger
            if c != "9":
                alts.append(d[:i] + _digits(int(c) + 1, 9) + "[0-9]*")
        alts.append(d + "[0-9]*[1-9][0-9]*")  # F extends d with a non-zero digit
    if op in ("<", "<="):
        for i, c in enumerate(d):  # F and d first differ at i, F's digit smaller
            if c != "0":
                alts.append(d[:i] + _digits(0, int(c) - 1) + "[0-9]*")
        alts.extend(d[:j] for j in range(1, len(d)))  # F a proper prefix of d (d's rest is non-zero)
    if op in (">=", "<="):
        alts.append(d + "0*" if d else "0+")  # the same value
    return "(?:" + "|".join(alts) + ")" if alts else None


def cmp_regex(op: str, bound: Fraction) -> str | None:
    """A regex of the non-negative exponent-free spellings whose value `op` (">", ">=", "<", "<=") `bound`
    (a decimal >= 0); None if there are none."""
    from .json_schema import _nonneg_range  # the integer-range regex, shared

    whole, d = _split(bound)
    alts = []
    if op in (">", ">="):
        alts.append(_nonneg_range(whole + 1, None) + r"(?:\.[0-9]+)?")
    elif whole >= 1:
        alts.append(_nonneg_range(0, whole - 1) + r"(?:\.[0-9]+)?")
    # the integer part equals `whole`: no fraction (value whole) or 0.F compared with 0.d
    no_fraction = {">": False, ">=": not d, "<": bool(d), "<=": True}[op]
    frac = _frac_regex(op, d)
    tail = [r"\." + frac] if frac is not None else []
    if no_fraction:
        tail.append("")
    if tail:
        alts.append(str(whole) + "(?:" + "|".join(tail) + ")")
    return "(?:" + "|".join(alts) + ")" if alts else None


def lower_bound_regex(lo: Fraction, exclusive: bool) -> str | None:
    """Exponent-free spellings (both signs) of numbers >= lo (> lo if `exclusive`); None if none."""
    op, flip = (">", "<") if exclusive else (">=", "<=")
    parts = [NONNEG if lo < 0 else cmp_regex(op, lo)]
    if lo <= 0:  # -v >= lo  <=>  v <= -lo
        neg = cmp_regex(flip, -lo)
        parts.append(None if neg is None else "-" + neg)
    parts = [p for p in parts if p is not None]
    return "(?:" + "|".join(parts) + ")" if parts else None


def upper_bound_regex(hi: Fraction, exclusive: bool) -> str | None:
    """Exponent-free spellings (both signs) of numbers <= hi (< hi if `exclusive`); None if none."""
    op, flip = ("<", ">") if exclusive else ("<=", ">=")
    parts = [None if hi < 0 else cmp_regex(op, hi)]
    parts.append("-" + NONNEG if hi > 0 else "-" + (cmp_regex(flip, -hi) or "(?!)"))
    parts = [p for p in parts if p is not None and p != "-(?!)"]
    return "(?:" + "|".join(parts) + ")" if parts else None


# Byte classes of the residue automaton: "-", the ten digits, ".", anything else.
_CLASS_OF = np.full(256, 12, dtype=np.int64)
_CLASS_OF[ord("-")] = 0
_CLASS_OF[ord("0") : ord("9") + 1] = np.arange(1, 11)
_CLASS_OF[ord(".")] = 11


def multiple_dfa(step: Fraction, *, integer_only: bool) -> ByteDFA | None:
    """The minimal DFA of exponent-free spellings (integers only: `-?(0|[1-9][0-9]*)`) whose value is an
    integer multiple of `step` (> 0, a finite decimal); None if the residue automaton would exceed
    `MAX_MULTIPLE_STATES` rows.

    With step = P/Q in lowest terms and Q | 10^s, x is a multiple iff M = x * 10^s is an integer (fraction
    digits past the s-th are zeros) and M ≡ 0 (mod K), K = P * 10^s / Q. Reading the digits of M keeps its
    residue; a number that stops after j < s fraction digits has M = (digits so far) * 10^(s - j).
    """
    p, q = step.numerator, step.denominator
    if integer_only:  # x * Q / P is an integer iff P | x (gcd(P, Q) = 1)
        s, k = 0, p
    else:
        s = 0
        while 10**s % q:
            s += 1
            if s > 400:
                raise ValueError(f"multipleOf {step} is not a finite decimal")
        k = p * (10**s // q)
    width = max(s, 1)  # fraction states F(r, j), j = 1..width
    n = 3 + k * (2 + width)
    if n > MAX_MULTIPLE_STATES:
        return None
    start, neg, zero = 0, 1, 2
    r = np.arange(k)

    def i_state(res: np.ndarray | int) -> np.ndarray | int:
        return 3 + res

    def d_state(res: np.ndarray | int) -> np.ndarray | int:
        return 3 + k + res

    def f_state(res: np.ndarray | int, j: int) -> np.ndarray | int:
        return 3 + 2 * k + (j - 1) * k + res

    table = np.full((n, 13), -1, dtype=np.int32)
    accepting = np.zeros(n, dtype=bool)
    table[start, 0] = neg
    for src in (start, neg):
        table[src, 1] = zero
        for d in range(1, 10):
            table[src, 1 + d] = i_state(d % k)
    accepting[zero] = True
    accepting[i_state(r)] = (r * pow(10, s, k)) % k == 0
    for d in range(10):
        table[i_state(r), 1 + d] = i_state((10 * r + d) % k)
    if not integer_only:
        table[i_state(r), 11] = d_state(r)
        table[zero, 11] = d_state(0)
        if s >= 1:
            for d in range(10):
                table[d_state(r), 1 + d] = f_state((10 * r + d) % k, 1)
        else:
            table[d_state(r), 1] = f_state(r, 1)  # step an integer: only zeros after the point
        for j in range(1, width + 1):
            accepting[f_state(r, j)] = (r * pow(10, s - min(j, s), k)) % k == 0
            if j < s:
                for d in range(10):
                    table[f_state(r, j), 1 + d] = f_state((10 * r + d) % k, j + 1)
            else:
                table[f_state(r, j), 1] = f_state(r, j)  # past the s-th digit: zeros only
    return minimize(table, accepting, start, _CLASS_OF)
