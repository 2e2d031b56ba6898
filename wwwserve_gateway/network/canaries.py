"""Questions with a known answer: canaries that test executors and judges, and checkable questions
for the reference judge.

A canary is a small spec (`{"kind": "arith", "a": 37, "b": 12, "op": "*"}`); the question an
executor is asked and the check of its answer both follow from the spec alone, so every node can
verify a canary duel's outcome from the ledger. The questions read like app traffic (short tasks
with one right answer), and are drawn from a space too large to list.
"""

from __future__ import annotations

import random
import re
from typing import Any

# Facts any small model may know; answers are checked case-insensitively as a whole word.
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Russia": "Moscow",
    "China": "Beijing",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Argentina": "Aires",
}
WORDS = (
    "apple river stone cloud garden silver window orange candle forest planet rocket butter "
    "mirror pencil dragon violin harbor marble tunnel basket copper jungle ladder meadow"
).split()
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
KINDS = ("arith", "capital", "upper", "count")


class InvalidCanary(ValueError):
    pass


def make(rng: random.Random) -> dict[str, Any]:
    """A fresh canary spec."""
    kind = rng.choice(KINDS)
    if kind == "arith":
        op = rng.choice(tuple(OPS))
        hi = 99 if op == "*" else 999
        return {"kind": kind, "a": rng.randint(2, hi), "b": rng.randint(2, hi), "op": op}
    if kind == "capital":
        return {"kind": kind, "country": rng.choice(sorted(CAPITALS))}
    word = rng.choice(WORDS)
    if kind == "upper":
        return {"kind": kind, "word": word}
    return {"kind": kind, "word": word, "letter": rng.choice(sorted(set(word)))}


def check_spec(spec: Any) -> dict[str, Any]:
    """`spec` if it is a valid canary (strict: it comes from the network), else InvalidCanary."""
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise InvalidCanary("a canary is {kind: arith|capital|upper|count, ...}")
    kind = spec["kind"]
    fields = {
        "arith": {"a", "b", "op"},
        "capital": {"country"},
        "upper": {"word"},
        "count": {"word", "letter"},
    }
    if set(spec) != {"kind", *fields[kind]}:
        raise InvalidCanary(f"a {kind} canary has exactly the keys {sorted(fields[kind])}")
    if kind == "arith":
        a, b = spec["a"], spec["b"]
        if spec["op"] not in OPS or not all(type(n) is int and 0 <= n < 10_000 for n in (a, b)):
            raise InvalidCanary("an arith canary is two integers in [0, 10000) and + - or *")
    elif kind == "capital":
        if spec["country"] not in CAPITALS:
            raise InvalidCanary("a capital canary names a known country")
    elif spec["word"] not in WORDS or (kind == "count" and spec["letter"] not in spec["word"]):
        raise InvalidCanary("a word canary uses a known word (and one of its letters)")
    return spec


def question(spec: dict[str, Any]) -> str:
    kind = spec["kind"]
    if kind == "arith":
        return f"What is {spec['a']} {spec['op']} {spec['b']}? Reply with the number only."
    if kind == "capital":
        return f"What is the capital city of {spec['country']}? Reply with the city name only."
    if kind == "upper":
        return f"Reply with the word {spec['word']} in capital letters and nothing else."
    return f"How many times does the letter {spec['letter']} appear in the word {spec['word']}? Reply with the number only."


def reference(spec: dict[str, Any]) -> str:
    kind = spec["kind"]
    if kind == "arith":
        return str(OPS[spec["op"]](spec["a"], spec["b"]))
    if kind == "capital":
        return CAPITALS[spec["country"]]
    if kind == "upper":
        return spec["word"].upper()
    return str(spec["word"].count(spec["letter"]))


def messages(spec: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": question(spec)}]


_NUMBER = re.compile(r"-?\d[\d,]*")


def is_right(spec: dict[str, Any], text: str) -> bool:
    """Whether an answer gives the canary's right answer (its last number, or the word as a word)."""
    expected = reference(spec)
    if spec["kind"] in ("arith", "count"):
        numbers = _NUMBER.findall(text)
        return bool(numbers) and numbers[-1].replace(",", "") == expected
    if spec["kind"] == "upper":
        return text.strip().strip(".!\"'*`") == expected
    return re.search(rf"\b{re.escape(expected)}\b", text, re.IGNORECASE) is not None


_PATTERNS = (
    (re.compile(r"What is (\d+) ([-+*]) (\d+)\? Reply with the number only\."), "arith"),
    (re.compile(r"What is the capital city of (\w+)\? Reply with the city name only\."), "capital"),
    (re.compile(r"Reply with the word (\w+) in capital letters and nothing else\."), "upper"),
    (
        re.compile(
            r"How many times does the letter (\w) appear in the word (\w+)\? Reply with the number only\."
        ),
        "count",
    ),
)


def recognise(text: str) -> dict[str, Any] | None:
    """The spec of a checkable question written the way `question` writes them, or None."""
    for pattern, kind in _PATTERNS:
        found = pattern.fullmatch(text.strip())
        if found is None:
            continue
        g = found.groups()
        spec: dict[str, Any]
        if kind == "arith":
            spec = {"kind": kind, "a": int(g[0]), "b": int(g[2]), "op": g[1]}
        elif kind == "capital":
            spec = {"kind": kind, "country": g[0]}
        elif kind == "upper":
            spec = {"kind": kind, "word": g[0]}
        else:
            spec = {"kind": kind, "word": g[1], "letter": g[0]}
        try:
            return check_spec(spec)
        except InvalidCanary:
            return None
    return None
