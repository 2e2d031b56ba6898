"""The SSE cutter relays exactly the upstream events, however the network splits the bytes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wwwserve_gateway.http.sse import DONE, MalformedEvent, SSECutter
from wwwserve_gateway.plugin_api.backend import Usage

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


def chunk(text: str) -> bytes:
    body = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE_EVENT = (
    b"data: "
    + orjson.dumps(
        {
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }
    )
    + b"\n\n"
)


def relay(raw: bytes, cuts: list[int], hide_usage: bool) -> tuple[bytes, SSECutter]:
    cutter = SSECutter(Usage.from_dict, hide_usage=hide_usage)
    out = []
    bounds = sorted({min(c, len(raw)) for c in cuts})
    start = 0
    for end in [*bounds, len(raw)]:
        out.append(cutter.feed(raw[start:end]))
        start = end
    out.append(cutter.flush())
    return b"".join(out), cutter


@given(st.lists(texts, max_size=12), st.lists(st.integers(0, 4000), max_size=30), st.booleans())
def test_any_split_relays_every_event_once(contents: list[str], cuts: list[int], hide_usage: bool) -> None:
    events = b"".join(chunk(t) for t in contents)
    raw = events + USAGE_EVENT + DONE
    out, cutter = relay(raw, cuts, hide_usage)
    assert out == (events + DONE if hide_usage else raw)
    assert cutter.usage == Usage(3, 5, 8)


@given(st.lists(st.integers(0, 200), max_size=10))
def test_text_that_mentions_usage_is_not_mistaken_for_it(cuts: list[int]) -> None:
    raw = chunk('the "usage" of words') + chunk("usage") + DONE
    out, cutter = relay(raw, cuts, hide_usage=True)
    assert out == raw
    assert cutter.usage is None


def test_last_event_without_blank_line_is_delivered() -> None:
    out, _ = relay(chunk("a") + b"data: [DONE]", [], hide_usage=False)
    assert out == chunk("a") + DONE


def test_malformed_usage_event_is_an_error() -> None:
    with pytest.raises(MalformedEvent):
        SSECutter(Usage.from_dict).feed(b'data: {"usage": \n\n')
