"""A judge for requests with a checkable answer: arithmetic, capitals, spelling, counting.

The request's last user message is matched against the questions `network.canaries` writes; when it
is one, each answer is graded against the known answer: one right and one wrong decides, both right
or both wrong is a tie. Other requests go to the fallback: abstain, or the LLM judge.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wwwserve_gateway.network import canaries
from wwwserve_gateway.plugin_api.base import PluginSettings
from wwwserve_gateway.plugin_api.judge import Judge, JudgeCase, Verdict
from wwwserve_gateway.plugins.judges.llm import LLMJudge, LLMJudgeSettings


class ReferenceJudgeSettings(LLMJudgeSettings):
    otherwise: Literal["abstain", "llm"] = Field(
        "abstain", description="for a request without a checkable answer: 'abstain' or 'llm'"
    )


class ReferenceJudge(Judge):
    Settings = ReferenceJudgeSettings
    settings: ReferenceJudgeSettings

    def __init__(self, node, settings: PluginSettings) -> None:
        super().__init__(node, settings)
        llm = LLMJudgeSettings(**settings.model_dump(exclude={"otherwise"}))
        self.fallback = LLMJudge(node, llm) if self.settings.otherwise == "llm" else None

    async def judge(self, case: JudgeCase) -> Verdict:
        spec = canaries.recognise(case.last_user_message)
        if spec is None:
            return await self.fallback.judge(case) if self.fallback else Verdict.ABSTAIN
        right_a, right_b = (canaries.is_right(spec, text) for text in case.answers)
        if right_a == right_b:
            return Verdict.TIE
        return Verdict.A if right_a else Verdict.B
