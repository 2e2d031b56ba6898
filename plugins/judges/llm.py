"""The default judge: the node's own model compares the two answers.

The prompt follows the reference implementation's criteria (correctness, completeness, strict
adherence to the instructions). Each answer is cut to `answer_chars` characters, as the reference
cuts at 1.2 x max_tokens characters, so a long answer cannot crowd out the other.

Two guards beyond the reference, because small models are poor judges:
- `constrained`: the verdict is asked for as JSON under a schema (OpenAI's `response_format`, which
  llama.cpp, vLLM and SGLang enforce with a grammar), so the model cannot ramble or echo the prompt;
  a server that refuses `response_format` is asked in free text from then on, and the last line's
  `[[A]]`, `[[B]]` or `[[TIE]]` is read strictly (`verdicts`). Unreadable output is an abstention.
- `swap`: the model judges both orders, and an answer wins only if it wins in both; verdicts that
  follow the position rather than the answer are a tie (the conservative rule of Zheng et al. 2023,
  "Judging LLM-as-a-judge"). A 135M model, asked once, picks whichever answer is shown first about
  80% of the time whatever the answers are.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from pydantic import Field

from wwwserve_gateway.http.errors import GatewayError
from wwwserve_gateway.plugin_api.backend import Backend, Endpoint
from wwwserve_gateway.plugin_api.base import PluginSettings
from wwwserve_gateway.plugin_api.judge import Judge, JudgeCase, Verdict
from wwwserve_gateway.plugin_api.node import NodeAPI
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

Which answer is better? {reply}"""

FREE_TEXT = "Reply with exactly one of [[A]], [[B]] or [[TIE]] on the last line."
AS_JSON = 'Reply in JSON: {"better": "A"}, {"better": "B"} or {"better": "TIE"}.'
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "verdict",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"better": {"type": "string", "enum": ["A", "B", "TIE"]}},
            "required": ["better"],
            "additionalProperties": False,
        },
    },
}
_SWAPPED = {
    Verdict.A: Verdict.B,
    Verdict.B: Verdict.A,
    Verdict.TIE: Verdict.TIE,
    Verdict.ABSTAIN: Verdict.ABSTAIN,
}


class LLMJudgeSettings(PluginSettings):
    model: str | None = Field(
        None,
        description="the model_name of a local deployment to judge with; unset: the duel's model if "
        "served here, else the first deployment",
    )
    max_tokens: int = Field(24, ge=1, le=4096, description="tokens the judge model may write")
    answer_chars: int = Field(2000, ge=100, description="characters of each answer shown to the judge")
    constrained: bool = Field(
        True, description="ask for the verdict as JSON under a schema (response_format); off: free text"
    )
    swap: bool = Field(
        True, description="judge both orders; an answer wins only if it wins in both, else a tie"
    )


class LLMJudge(Judge):
    Settings = LLMJudgeSettings
    settings: LLMJudgeSettings

    def __init__(self, node: NodeAPI, settings: LLMJudgeSettings) -> None:
        super().__init__(node, settings)
        self.free_text_only: set[str] = set()  # deployments that refused response_format

    def backend_for(self, model: str) -> Backend | None:
        """A ready local deployment to judge with."""
        wanted = self.settings.model or model
        backends = [b for b in self.node.backends if b.ready]
        for backend in backends:
            if backend.model_name == wanted:
                return backend
        return backends[0] if backends and self.settings.model is None else None

    def prompt(self, case: JudgeCase, *, as_json: bool = False, swapped: bool = False) -> str:
        cut = self.settings.answer_chars
        a, b = (case.answers[1], case.answers[0]) if swapped else case.answers
        return PROMPT.format(
            question=case.question, a=a[:cut], b=b[:cut], reply=AS_JSON if as_json else FREE_TEXT
        )

    async def judge(self, case: JudgeCase) -> Verdict:
        backend = self.backend_for(case.model)
        if backend is None:
            return Verdict.ABSTAIN
        first = await self.ask(backend, case, swapped=False)
        if not self.settings.swap or first is Verdict.ABSTAIN:
            return first
        second = _SWAPPED[await self.ask(backend, case, swapped=True)]
        if second is Verdict.ABSTAIN:
            return Verdict.ABSTAIN
        return first if first is second else Verdict.TIE

    async def ask(self, backend: Backend, case: JudgeCase, *, swapped: bool) -> Verdict:
        """One verdict on the answers in the order shown (A first, or B first when `swapped`)."""
        as_json = self.settings.constrained and backend.id not in self.free_text_only
        body: dict[str, Any] = {
            "model": backend.model_name,
            "messages": [{"role": "user", "content": self.prompt(case, as_json=as_json, swapped=swapped)}],
            "max_tokens": self.settings.max_tokens,
            "temperature": 0,
        }
        if as_json:
            body["response_format"] = SCHEMA
        try:
            reply = await backend.complete(Endpoint.CHAT, body)
        except GatewayError as exc:
            if not as_json or exc.status >= 500:
                raise
            log.info("the judge model refused response_format; asking in free text", backend=backend.id)
            self.free_text_only.add(backend.id)
            return await self.ask(backend, case, swapped=swapped)
        try:
            text = orjson.loads(reply.body)["choices"][0]["message"]["content"] or ""
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            log.warning("the judge model's reply is not a chat completion", backend=backend.id)
            return Verdict.ABSTAIN
        return _json_verdict(text) if as_json else parse_verdict(text)


def _json_verdict(text: str) -> Verdict:
    try:
        better = orjson.loads(text).get("better")
    except (orjson.JSONDecodeError, AttributeError):
        return parse_verdict(text)  # a server that ignored the schema: read what it wrote
    return {"A": Verdict.A, "B": Verdict.B, "TIE": Verdict.TIE}.get(better, Verdict.ABSTAIN)
