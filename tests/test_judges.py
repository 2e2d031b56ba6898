"""The judges: the verdict parser on messy model output, the reference and LLM judges, the judge
service's refusals, and the entry's per-judge answer order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes.plugins import node_api
from tests.support import LlamaServer
from wwwserve_gateway.delegation.judging import InvalidJudgeRequest, parse_judge_request
from wwwserve_gateway.http.errors import InvalidRequest
from wwwserve_gateway.network import canaries
from wwwserve_gateway.plugin_api.judge import JudgeCase, Verdict
from wwwserve_gateway.plugins.judges.llm import LLMJudge, LLMJudgeSettings
from wwwserve_gateway.plugins.judges.reference import ReferenceJudge, ReferenceJudgeSettings
from wwwserve_gateway.plugins.judges.verdicts import parse_verdict

# -- the parser ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("[[A]]", Verdict.A),
        ("Answer B is more complete.\n\n[[B]]", Verdict.B),
        ("**[[ tie ]]**", Verdict.TIE),
        ("Both are fine. [[TIE]]", Verdict.TIE),
        ("A", Verdict.A),
        ("**B**", Verdict.B),
        ('"A".', Verdict.A),
        ("Tie.", Verdict.TIE),
        ("Verdict: B", Verdict.B),
        ("The better answer is A because it is correct.", Verdict.A),
        ("Answer A is better.", Verdict.A),
        ("It's a tie.", Verdict.TIE),
        ("#", Verdict.ABSTAIN),
        ("", Verdict.ABSTAIN),
        ("I cannot decide between them.", Verdict.ABSTAIN),
        ("A good answer would mention Paris. B mentions Lyon.", Verdict.ABSTAIN),  # letters in prose
        ("Verdict: A. Final answer: B", Verdict.ABSTAIN),  # statements that disagree
        ("[[A]] ... on reflection [[B]]", Verdict.B),  # the last bracketed verdict
    ],
)
def test_verdicts_are_read_strictly(text: str, verdict: Verdict) -> None:
    assert parse_verdict(text) is verdict


PROSE = st.text(alphabet=st.sampled_from("cdefghijklmnopqrsuvwxyz .,;:!?\n0123456789"), max_size=200)


@given(
    PROSE, st.sampled_from(["A", "B", "TIE", "a", "b", "tie"]), PROSE, st.sampled_from(["", "**", "'", '"'])
)
def test_a_bracketed_verdict_survives_any_surrounding_prose(
    before: str, letter: str, after: str, quote: str
) -> None:
    text = f"{before}[[{quote}{letter}{quote}]]{after}"
    assert parse_verdict(text).value == {"a": "A", "b": "B", "tie": "tie"}[letter.lower()]


@given(st.text(max_size=300))
def test_any_text_gives_a_verdict_or_an_abstention_never_an_error(text: str) -> None:
    assert parse_verdict(text) in set(Verdict)


@given(PROSE)
def test_prose_without_a_verdict_is_an_abstention(text: str) -> None:
    assert parse_verdict(text) is Verdict.ABSTAIN


# -- the reference judge -----------------------------------------------------------------------------


def case(question: str, a: str, b: str, model: str = "m") -> JudgeCase:
    request = {"model": model, "messages": [{"role": "user", "content": question}]}
    return JudgeCase("00" * 32, model, "chat/completions", request, (a, b))


async def test_the_reference_judge_grades_checkable_questions() -> None:
    judge = ReferenceJudge(node_api(), ReferenceJudgeSettings())
    rng = random.Random(3)
    for _ in range(50):
        spec = canaries.make(rng)
        right, wrong = canaries.reference(spec), "I am not sure."
        question = canaries.question(spec)
        assert await judge.judge(case(question, right, wrong)) is Verdict.A
        assert await judge.judge(case(question, wrong, right)) is Verdict.B
        assert await judge.judge(case(question, right, right + ".")) is Verdict.TIE
    assert await judge.judge(case("Write a poem about the sea.", "waves", "salt")) is Verdict.ABSTAIN


# -- the LLM judge, on a real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_server(smollm2_path: Path):
    server = LlamaServer(smollm2_path, "smol")
    yield server
    server.stop()


async def test_the_llm_judge_asks_its_own_model_and_reads_a_verdict(smollm2_server, make_backend) -> None:
    backend = await make_backend("openai/smol", api_base=smollm2_server.base_url)
    api = node_api(backends=[backend])
    judge = LLMJudge(api, LLMJudgeSettings(max_tokens=8))
    assert "[Answer A]\nParis" in judge.prompt(case("Capital of France?", "Paris", "Lyon"))
    verdicts = [
        await judge.judge(case("What is the capital city of France?", "Paris", "Berlin")) for _ in range(2)
    ]
    assert all(v in set(Verdict) for v in verdicts)
    # Without a deployment of the wanted model, it abstains rather than guess.
    picky = LLMJudge(api, LLMJudgeSettings(model="another"))
    assert await picky.judge(case("Capital of France?", "Paris", "Lyon")) is Verdict.ABSTAIN


PAIRS = [
    ("What is the capital city of France?", "The capital of France is Paris.", "Berlin"),
    ("What is 885 + 969?", "885 + 969 = 1854", "7 ) O{ k uy q7 ( (68&46&4y X"),
    ("Spell the word 'house' backwards.", "esuoh", "the house is big and nice"),
]
FLIP = {
    Verdict.A: Verdict.B,
    Verdict.B: Verdict.A,
    Verdict.TIE: Verdict.TIE,
    Verdict.ABSTAIN: Verdict.ABSTAIN,
}


async def test_a_constrained_verdict_is_always_readable(smollm2_server, make_backend) -> None:
    # Asked in free text, this 135M model echoes the prompt and every verdict is an abstention; under
    # the JSON schema it always answers.
    backend = await make_backend("openai/smol", api_base=smollm2_server.base_url)
    judge = LLMJudge(node_api(backends=[backend]), LLMJudgeSettings(swap=False))
    for question, a, b in PAIRS:
        for swapped in (False, True):
            assert await judge.ask(backend, case(question, a, b), swapped=swapped) is not Verdict.ABSTAIN


async def test_an_answer_wins_only_if_it_wins_in_both_orders(smollm2_server, make_backend) -> None:
    backend = await make_backend("openai/smol", api_base=smollm2_server.base_url)
    judge = LLMJudge(node_api(backends=[backend]), LLMJudgeSettings())
    for question, a, b in PAIRS:
        both = case(question, a, b)
        shown_first = await judge.ask(backend, both, swapped=False)
        shown_second = FLIP[await judge.ask(backend, both, swapped=True)]
        expected = shown_first if shown_first is shown_second else Verdict.TIE
        assert await judge.judge(both) is expected
        # The verdict is about the answers, not the order they came in.
        assert await judge.judge(case(question, b, a)) is FLIP[expected]


class RefusesResponseFormat:
    """A real deployment behind a server that rejects `response_format` with a 400, as some
    OpenAI-compatible servers do."""

    def __init__(self, backend) -> None:
        self.inner, self.id, self.model_name, self.ready = backend, backend.id, backend.model_name, True
        self.refused = 0

    async def complete(self, endpoint, body):
        if "response_format" in body:
            self.refused += 1
            raise InvalidRequest("response_format is not supported", param="response_format")
        return await self.inner.complete(endpoint, body)


async def test_a_server_without_response_format_is_asked_in_free_text(smollm2_server, make_backend) -> None:
    backend = RefusesResponseFormat(await make_backend("openai/smol", api_base=smollm2_server.base_url))
    judge = LLMJudge(node_api(backends=[backend]), LLMJudgeSettings(max_tokens=8))
    for question, a, b in PAIRS[:2]:
        assert await judge.judge(case(question, a, b)) in set(Verdict)
    assert backend.refused == 1  # asked once with the schema, then in free text


# -- the judge service and the entry's order ---------------------------------------------------------


def request_body(**changes: object) -> dict:
    body = {
        "duel": "ab" * 32,
        "model": "m",
        "endpoint": "chat/completions",
        "request": {"model": "m", "messages": []},
        "answers": ["one", "two"],
    }
    return {**body, **changes}


@pytest.mark.parametrize(
    "bad",
    [
        {"duel": "not a hash"},
        {"endpoint": "embeddings"},
        {"answers": ["only one"]},
        {"answers": ["same", " same\r\n"]},  # the same text once normalised: nothing to judge
        {"answers": ["x" * 70_000, "y"]},
        {"extra": 1},
    ],
)
def test_the_judge_service_refuses_malformed_requests(bad: dict) -> None:
    with pytest.raises(InvalidJudgeRequest):
        parse_judge_request(request_body(**bad))


def test_a_judge_request_carries_no_node_ids_and_normalised_answers() -> None:
    parsed = parse_judge_request(request_body(answers=["  one\r\ntwo  ", "three"]))
    assert parsed.answers == ("one\ntwo", "three")
