"""The default judge: the node's own model compares the two answers.

The prompt follows the reference implementation's criteria (correctness, completeness, strict
adherence to the instructions) and asks for a bracketed verdict on the last line, which `verdicts`
reads strictly; anything else is an abstention. Each answer is cut to `answer_chars` characters, as
the reference cuts at 1.2 x max_tokens characters, so a long answer cannot crowd out the other.
"""

from __future__ import annotations

import orjson
import structlog
from pydantic import Field

from wwwserve_gateway.plugin_api.backend import Backend, Endpoint
from wwwserve_gateway.plugin_api.base import PluginSettings
from wwwserve_gateway.plugin_api.judge import Judge, JudgeCase, Verdict
from wwwserve_gateway.plugins.judges.verdicts import parse_verdict

log = structlog.get_logger(__name__)

PROMPT = """You are a careful and strict reviewer. Compare two answers to the same request.
Judge correctness first, then completeness, then how strictly each follows the request's instructions.
Ignore length and style unless the request asks for them. Do not favour an answer for its position.

[Request]
{question}

[Answer A]
{a}

[Answer B]
{b}

Which answer is better? Reply with exactly one of [[A]], [[B]] or [[TIE]] on the last line."""


class LLMJudgeSettings(PluginSettings):
    model: str | None = Field(
        None,
        description="the model_name of a local deployment to judge with; unset: the duel's model if "
        "served here, else the first deployment",
    )
    max_tokens: int = Field(24, ge=1, le=4096, description="tokens the judge model may write")
    answer_chars: int = Field(2000, ge=100, description="characters of each answer shown to the judge")


class LLMJudge(Judge):
    Settings = LLMJudgeSettings
    settings: LLMJudgeSettings

    def backend_for(self, model: str) -> Backend | None:
        """A ready local deployment to judge with."""
        wanted = self.settings.model or model
        backends = [b for b in self.node.backends if b.ready]
        for backend in backends:
            if backend.model_name == wanted:
                return backend
        return backends[0] if backends and self.settings.model is None else None

    def prompt(self, case: JudgeCase) -> str:
        cut = self.settings.answer_chars
        return PROMPT.format(question=case.question, a=case.answers[0][:cut], b=case.answers[1][:cut])

    async def judge(self, case: JudgeCase) -> Verdict:
        backend = self.backend_for(case.model)
        if backend is None:
            return Verdict.ABSTAIN
        body = {
            "model": backend.model_name,
            "messages": [{"role": "user", "content": self.prompt(case)}],
            "max_tokens": self.settings.max_tokens,
            "temperature": 0,
        }
        reply = await backend.complete(Endpoint.CHAT, body)
        try:
            text = orjson.loads(reply.body)["choices"][0]["message"]["content"] or ""
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            log.warning("the judge model's reply is not a chat completion", backend=backend.id)
            return Verdict.ABSTAIN
        return parse_verdict(text)
