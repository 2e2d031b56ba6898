"""The judge slot: which of two answers to one request is better.

A node judges when a duel's entry asks it to (`delegation.judging`). The judge sees the request and
both answers' texts, blind (no node ids; each judge gets its own random order), and returns a
verdict; the node signs it as a vote. A judge that cannot tell, or whose output cannot be read,
abstains: abstaining costs a little stake, a wrong vote more (see the genesis `duels` section).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from wwwserve_gateway.plugin_api.base import Plugin


class Verdict(StrEnum):
    A = "A"
    B = "B"
    TIE = "tie"
    ABSTAIN = "abstain"


@dataclass(frozen=True, slots=True)
class JudgeCase:
    duel: str  # the duel's request hash: stable, and unique per duel
    model: str  # the model both executors were asked for
    endpoint: str  # "chat/completions" or "completions"
    request: dict[str, Any]  # the request body both executors answered
    answers: tuple[str, str]  # answer A's text, answer B's text (normalised)

    @property
    def question(self) -> str:
        """The request as text: a chat's messages as `role: content` lines, or the prompt."""
        messages = self.request.get("messages")
        if isinstance(messages, list):
            lines = []
            for m in messages:
                if isinstance(m, dict):
                    content = m.get("content")
                    if isinstance(content, list):  # content parts: their text only
                        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                    lines.append(f"{m.get('role', 'user')}: {content or ''}")
            return "\n".join(lines)
        prompt = self.request.get("prompt")
        return prompt if isinstance(prompt, str) else ""

    @property
    def last_user_message(self) -> str:
        """The last user message's text (a single-turn question's whole text), or the prompt."""
        messages = self.request.get("messages")
        if isinstance(messages, list):
            for m in reversed(messages):
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                    return m["content"]
            return ""
        return self.question


class Judge(Plugin, ABC):
    """Pairwise judgement. Called concurrently for different duels; a slow judge is cut off at the
    genesis `judge_timeout_s` (and abstains)."""

    @abstractmethod
    async def judge(self, case: JudgeCase) -> Verdict:
        """A, B, tie, or abstain."""
