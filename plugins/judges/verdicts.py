"""Reading a judge model's verdict: strict when it can be, never a guess.

The prompt asks for one of `[[A]]`, `[[B]]` or `[[TIE]]` on the last line. Small models wrap it in
markdown, add a sentence, or drop the brackets, so a verdict is read from, in order of strength:

1. the last bracketed verdict, `[[A]]` (spaces, case and quotes around it do not matter);
2. the whole answer being the verdict alone: `A`, `**B**`, `Tie.`, `"A"`;
3. the last explicit statement: `Answer: A`, `Verdict: tie`, `Winner - B`, `the better answer is A`,
   `Answer A is better`.

Anything else, a letter merely mentioned in prose, or statements that disagree, is an abstention: a
judge that cannot be read does not vote, rather than having a vote read into its words.
"""

from __future__ import annotations

import re

from wwwserve_gateway.plugin_api.judge import Verdict

_WORD = {"a": Verdict.A, "b": Verdict.B, "tie": Verdict.TIE, "draw": Verdict.TIE, "#": Verdict.ABSTAIN}
_BRACKETED = re.compile(r"\[\[\s*[\"'*]*\s*(A|B|TIE|DRAW)\s*[\"'*]*\s*\]\]", re.IGNORECASE)
_ALONE = re.compile(r"^[\s\"'*_`#>.:\-()\[\]]*(A|B|TIE|DRAW|#)[\s\"'*_`.!)\]]*$", re.IGNORECASE)
_STATED = re.compile(
    r"(?:\b(?:final\s+)?(?:answer|verdict|winner|choice|decision|result)\s*(?:is|:|-|=)\s*[\"'*]*"
    r"(?:answer\s+|response\s+)?(A|B|tie|draw)\b"
    r"|\bthe\s+better\s+(?:answer|response)\s+is\s+[\"'*]*(?:answer\s+|response\s+)?(A|B)\b"
    r"|\b(?:answer|response)\s+[\"'*]*(A|B)[\"'*]*\s+is\s+(?:the\s+)?better\b"
    r"|\bit\s*(?:'|\u2019)?s\s+a\s+(tie|draw)\b)",
    re.IGNORECASE,
)


def parse_verdict(text: str) -> Verdict:
    bracketed = _BRACKETED.findall(text)
    if bracketed:
        return _WORD[bracketed[-1].lower()]
    alone = _ALONE.match(text)
    if alone:
        return _WORD[alone.group(1).lower()]
    stated = {_WORD[next(g for g in m if g).lower()] for m in _STATED.findall(text)}
    if len(stated) == 1:
        return stated.pop()
    return Verdict.ABSTAIN
