"""The delegation protocol between an entry's Delegator and executors on real overlays (127.0.0.1).

Executors here are scripted overlay handlers, honest or misbehaving: declines, stalls, dead
connections, garbage, forged or wrong receipts, backend errors, and deaths mid-stream (continued at
another executor so the app reads one answer). Unit tests cover continuation.py and the wire checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tests.fakes.plugins import FakeLedger, node_api
from tests.overlay_support import OverlayNode
from tests.support import DEADLINE_S, until
from wwwserve_gateway.delegation import entry as entry_mod
from wwwserve_gateway.delegation import wire
from wwwserve_gateway.delegation.answers import AnswerReader, MalformedAnswer
from wwwserve_gateway.delegation.continuation import NOTHING, Progress, Stitcher, continuation_body, progress
from wwwserve_gateway.delegation.entry import Delegator, NoExecutor
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.http.errors import UpstreamError, error_body
from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import (
    check_receipt,
    decode_receipt,
    encode_receipt,
    request_hash,
    sign_receipt,
    text_hash,
)
from wwwserve_gateway.plugin_api import RequestInfo
from wwwserve_gateway.plugin_api.backend import Endpoint, Usage

MODEL = "m"
MAX_TOKENS = 10
PROMPT_TOKENS = 3
DONE = "data: [DONE]\n\n"
OTHER = NodeIdentity.generate()  # a node that takes no part: its key signs forged receipts
# The entry's stall timeout unless a test is about stalls: it never fires within a test, so a test that
# finishes shows that something else (an accept timeout, a lost connection) moved the request on.
NEVER = 3600.0

Items = Callable[[OverlayNode, dict[str, Any]], list[dict[str, Any]]]


# -- what executors send -------------------------------------------------------------------------


def event(kind: str, choice: dict[str, Any], id: str, created: int) -> str:
    """One SSE data event of an answer object of `kind` with a single choice."""
    obj = {"id": id, "object": kind, "created": created, "model": MODEL, "choices": [{"index": 0, **choice}]}
    return "data: " + json.dumps(obj) + "\n\n"


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish: str | None = None,
    id: str = "c1",
    created: int = 1,
) -> str:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return event("chat.completion.chunk", {"delta": delta, "finish_reason": finish}, id, created)


def text_chunk(text: str, *, finish: str | None = None, id: str = "t1", created: int = 1) -> str:
    return event("text_completion", {"text": text, "finish_reason": finish}, id, created)


def stream_events(pieces: tuple[str, ...], *, role_first: bool = False, id: str = "c1", created: int = 1):
    events = [chunk(role="assistant", id=id, created=created)] if role_first else []
    events += [chunk(p, id=id, created=created) for p in pieces]
    events.append(chunk(finish="stop", id=id, created=created))
    return events


def answer_json(text: str, id: str = "c1") -> str:
    return json.dumps(
        {
            "id": id,
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": 5},
        }
    )


NET = NetworkGenesis().network_id  # the network of fakes.node_api


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def answer_text(endpoint: str, raw_answer: str) -> str:
    """The answer's text as a receipt hashes it (the first choice's content), from its SSE or JSON."""
    reader = AnswerReader(Endpoint(endpoint), "id", "m")
    try:
        reader.events(raw_answer) if raw_answer.startswith("data:") else reader.whole(raw_answer)
    except MalformedAnswer:
        pass
    return reader.text


def make_receipt(identity: NodeIdentity, raw: dict[str, Any], text: str, **override: Any) -> dict[str, Any]:
    """The receipt an honest executor signs for `raw` (the delegated request) answered with `text`."""
    now = time.time()
    fields: dict[str, Any] = {
        "net": NET,
        "entry": raw["route"][0],
        "request": request_hash(raw["id"], raw["endpoint"], raw["body"]),
        "response": sha(text),
        "text": text_hash(answer_text(raw["endpoint"], text)),
        "model": raw["body"]["model"],
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 2,
        "started": now,
        "finished": now,
    }
    fields.update(override)
    return sign_receipt(identity, **fields)


Receipt = Callable[[OverlayNode, dict[str, Any], str], dict[str, Any]]


def honest_receipt(node: OverlayNode, raw: dict[str, Any], text: str) -> dict[str, Any]:
    return make_receipt(node.identity, raw, text)


def accept_item(node: OverlayNode, raw: dict[str, Any]) -> dict[str, Any]:
    return {"t": "accept", "route": [*raw["route"], node.id]}


def answer(
    pieces: tuple[str, ...] = ("Hel", "lo"),
    *,
    role_first: bool = False,
    id: str = "c1",
    created: int = 1,
    receipt: Receipt = honest_receipt,
) -> Items:
    """An honest executor's items: accept, the answer (streamed or whole), a receipt over its bytes."""

    def items(node: OverlayNode, raw: dict[str, Any]) -> list[dict[str, Any]]:
        out = [accept_item(node, raw)]
        if raw["body"].get("stream"):
            events = stream_events(pieces, role_first=role_first, id=id, created=created)
            out += [{"t": "sse", "d": e} for e in events]
            text = "".join(events)
        else:
            text = answer_json("".join(pieces), id=id)
            out.append({"t": "json", "d": text})
        out.append({"t": "receipt", "r": receipt(node, raw, text)})
        return out

    return items


def declines(node: OverlayNode, raw: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"t": "decline", "reason": "busy"}]


async def scripted(
    node: OverlayNode,
    peer_id: str,
    raw: dict[str, Any],
    *,
    items: Items,
    hang: bool = False,
    seen: list[dict[str, Any]] | None = None,
    cancelled: asyncio.Event | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """A stream handler: yields `items`, then (with `hang`) waits until it is cancelled."""
    if seen is not None:
        seen.append(raw)
    try:
        for item in items(node, raw):
            yield item
        if hang:
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        if cancelled is not None:
            cancelled.set()
        raise


# -- the entry side --------------------------------------------------------------------------------


class App:
    """An ASGI `send` that keeps what the app would receive."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.usage: Usage | None = None  # what Delegator.stream returned

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def starts(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "http.response.start"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        (start,) = self.starts
        return dict(start["headers"])

    @property
    def bodies(self) -> list[str]:
        return [m["body"].decode() for m in self.messages if m["type"] == "http.response.body"]

    @property
    def text(self) -> str:
        return "".join(self.bodies)

    def objects(self) -> list[dict[str, Any]]:
        """The JSON objects of the data events the app received ([DONE] and comments left out)."""
        out = []
        for event in self.text.split("\n\n"):
            if event.startswith("data: ") and event != "data: [DONE]":
                out.append(json.loads(event[6:]))
        return out


def contents(objects: list[dict[str, Any]]) -> str:
    return "".join((o["choices"][0].get("delta") or {}).get("content") or "" for o in objects)


class Net:
    """An entry OverlayNode with a Delegator, and executor OverlayNodes its router offers in order."""

    def __init__(self, entry: OverlayNode) -> None:
        self.entry = entry
        self.executors: list[OverlayNode] = []
        self.stopped: set[str] = set()
        self.order: list[str] = []
        self.asked: list[RequestInfo] = []
        self.ledger = FakeLedger()
        self.registry = CollectorRegistry()
        self.metrics = DelegationMetrics(self.registry)

    @property
    def me(self) -> str:
        return self.entry.id

    async def executor(self, items: Items, **options: Any) -> OverlayNode:
        node = await OverlayNode(backoff_base=0.05, handshake_timeout=2.0).start()
        self.executors.append(node)
        node.overlay.on_stream(
            wire.KIND, lambda peer_id, raw: scripted(node, peer_id, raw, items=items, **options)
        )
        assert await self.entry.overlay.connect(node.url, node.id) == node.id
        self.order.append(node.id)
        return node

    async def stop(self, node: OverlayNode) -> None:
        self.stopped.add(node.id)
        await node.stop()

    def candidates(self, info: RequestInfo) -> list[str]:
        self.asked.append(info)
        return list(self.order)

    def delegator(self, stall_timeout: float = NEVER) -> Delegator:
        api = node_api(identity=self.entry.identity, overlay=self.entry.overlay, ledger=self.ledger)
        api.bind(router=SimpleNamespace(candidates=self.candidates))
        return Delegator(api, self.metrics, stall_timeout)

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def attempts(self, outcome: str) -> float:
        return self.count("wwwserve_delegation_attempts_total", outcome=outcome)

    def failovers(self, stage: str) -> float:
        return self.count("wwwserve_failovers_total", stage=stage)

    @property
    def bad_receipts(self) -> float:
        return sum(
            self.count("wwwserve_bad_receipts_total", reason=r)
            for r in ("bad_receipt", "inflated_receipt", "garbage")
        )

    def paid_to(self) -> list[str]:
        return [r["body"]["id"] for r in self.ledger.settled]


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = Net(await OverlayNode(backoff_base=0.05, handshake_timeout=2.0).start())
    try:
        yield n
    finally:
        for node in n.executors:
            if node.id not in n.stopped:
                await node.stop()
        await n.entry.stop()


def chat(stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        **extra,
    }


def info_for(body: dict[str, Any]) -> RequestInfo:
    return RequestInfo(
        id=uuid.uuid4().hex,
        model=body["model"],
        endpoint=Endpoint.CHAT.value,
        stream=bool(body.get("stream")),
        route=(),
        max_tokens=body.get("max_tokens"),
    )


async def run(
    net: Net,
    stream: bool,
    *,
    stall_timeout: float = NEVER,
    body: dict[str, Any] | None = None,
    delegator: Delegator | None = None,
) -> tuple[App, Any]:
    """One request through a Delegator: (app, usage) streamed, (None, (answer, headers, usage)) not."""
    body = body or chat(stream)
    delegator = delegator or net.delegator(stall_timeout)
    # As the dispatcher does: the answer first, then the receipts are paid.
    if stream:
        app = App()
        usage, receipts = await asyncio.wait_for(
            delegator.stream(info_for(body), Endpoint.CHAT, body, app), DEADLINE_S
        )
        for receipt in receipts:
            await delegator.pay(receipt)
        return app, usage
    *answer, receipts = await asyncio.wait_for(
        delegator.complete(info_for(body), Endpoint.CHAT, body), DEADLINE_S
    )
    for receipt in receipts:
        await delegator.pay(receipt)
    return App(), tuple(answer)


def relayed(sent: str, app_text: str) -> str:
    """What the entry relays of an executor's SSE text `sent`: each event compact, with the entry's
    own answer id (read from what the app got). The tests' events carry OpenAI's fields only."""
    first = next(e for e in app_text.split("\n\n") if e.startswith("data: {"))
    answer_id = json.loads(first[6:])["id"]
    out = []
    for event in sent.split("\n\n"):
        if event.startswith("data: {"):
            obj = {**json.loads(event[6:]), "id": answer_id}
            out.append("data: " + orjson.dumps(obj).decode() + "\n\n")
    return "".join(out)


def relayed_json(sent: str, got: bytes) -> bytes:
    """What the entry relays of a whole answer `sent`, with the entry's id (read from `got`)."""
    return orjson.dumps({**json.loads(sent), "id": json.loads(got)["id"]})


def expected_stream(net: Net, executor: OverlayNode, events: list[str]) -> str:
    """What the app reads from a served stream: the events, the route and receipt comments, [DONE]."""
    (record,) = net.ledger.settled
    route = f"{net.me},{executor.id}"
    return (
        "".join(events) + f": wwwserve-route {route}\n: wwwserve-receipt {encode_receipt(record)}\n\n" + DONE
    )


def assert_served_by(
    net: Net, executor: OverlayNode, result: tuple[App, Any], stream: bool, pieces=("Hel", "lo")
):
    """The answer the app got is exactly `executor`'s honest one, paid once, with its route."""
    app, out = result
    route = f"{net.me},{executor.id}"
    assert net.paid_to() == [executor.id]
    record = net.ledger.settled[0]
    assert check_receipt(record, NET)["entry"] == net.me
    if stream:
        assert len(app.starts) == 1 and app.starts[0]["status"] == 200
        assert app.headers[b"x-wwwserve-route"] == route.encode()
        assert app.text == expected_stream(net, executor, [relayed("".join(stream_events(pieces)), app.text)])
        assert out == Usage(PROMPT_TOKENS, 2, PROMPT_TOKENS + 2)
    else:
        body, headers, usage = out
        assert body == relayed_json(answer_json("".join(pieces)), body)
        h = dict(headers)
        assert h[b"x-wwwserve-route"] == route.encode()
        assert decode_receipt(h[b"x-wwwserve-receipt"].decode()) == record
        assert usage == Usage(PROMPT_TOKENS, 2, PROMPT_TOKENS + 2)


# -- 1. the happy path -----------------------------------------------------------------------------


async def test_streamed_answer_is_relayed_with_route_receipt_and_done(net: Net) -> None:
    x = await net.executor(answer())
    app, usage = await run(net, stream=True)
    assert_served_by(net, x, (app, usage), stream=True)
    assert [m["more_body"] for m in app.messages[1:]] == [True] * (len(app.messages) - 1)
    assert app.bodies[-1] == DONE
    # The trailer's receipt is the settled one, and checks.
    trailer = app.bodies[-2]
    token = trailer.split(": wwwserve-receipt ")[1].strip()
    record = decode_receipt(token)
    assert record == net.ledger.settled[0]
    body = check_receipt(record, NET)
    assert body["id"] == x.id and body["response"] == sha("".join(stream_events(("Hel", "lo"))))
    assert net.attempts("accepted") == 1
    assert net.failovers("before_output") == net.failovers("mid_stream") == 0
    assert net.bad_receipts == 0


async def test_whole_answer_has_route_and_a_valid_receipt_header(net: Net) -> None:
    x = await net.executor(answer())
    result = await run(net, stream=False)
    assert_served_by(net, x, result, stream=False)
    _, (answer_bytes, headers, _) = result
    body = check_receipt(decode_receipt(dict(headers)[b"x-wwwserve-receipt"].decode()), NET)
    assert body["id"] == x.id and body["entry"] == net.me
    # The receipt covers the bytes the executor sent; the app reads them rewritten (the entry's id).
    assert body["response"] == hashlib.sha256(answer_json("Hello").encode()).hexdigest()
    assert json.loads(answer_bytes)["id"].startswith("chatcmpl-")
    assert net.attempts("accepted") == 1 and net.bad_receipts == 0


async def test_the_executor_receives_the_delegated_request(net: Net) -> None:
    seen: list[dict[str, Any]] = []
    await net.executor(answer(), seen=seen)
    body = chat(False)
    info = info_for(body)
    await net.delegator().complete(info, Endpoint.CHAT, body)
    assert seen == [
        {
            "id": info.id,
            "endpoint": "chat/completions",
            "body": body,
            "route": [net.me],
            "continuation": False,
        }
    ]
    # The router is asked with the route so far.
    assert net.asked[0].route == (net.me,)


# -- 2. declines -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_decline_moves_to_the_next_candidate(net: Net, stream: bool) -> None:
    ghost = NodeIdentity.generate()  # no address known: unreachable
    await net.executor(declines)
    net.order.insert(0, ghost.node_id)
    net.order.insert(0, net.me)  # the entry itself is never asked
    x = await net.executor(answer())
    result = await run(net, stream)
    assert_served_by(net, x, result, stream)
    assert net.attempts("unreachable") == 1
    assert net.attempts("declined") == 1
    assert net.attempts("accepted") == 1
    assert net.failovers("before_output") == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_when_every_candidate_declines_there_is_no_executor(net: Net, stream: bool) -> None:
    for _ in range(3):
        await net.executor(declines)
    with pytest.raises(NoExecutor):
        await run(net, stream)
    assert net.attempts("declined") == 3
    assert net.attempts("accepted") == 0
    assert net.ledger.settled == []


async def test_no_candidates_at_all_is_no_executor(net: Net) -> None:
    app = App()
    with pytest.raises(NoExecutor):
        await net.delegator().stream(info_for(chat(True)), Endpoint.CHAT, chat(True), app)
    assert app.messages == []


# -- 3. a stall before the first item ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_candidate_silent_before_accepting_is_skipped_and_cancelled(
    net: Net, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(entry_mod, "ACCEPT_TIMEOUT_S", 0.3)
    cancelled = asyncio.Event()
    await net.executor(lambda node, raw: [], hang=True, cancelled=cancelled)
    x = await net.executor(answer())
    result = await run(net, stream)  # no stall timeout fires: the accept timeout moved on
    assert_served_by(net, x, result, stream)
    assert net.attempts("timeout") == 1 and net.attempts("accepted") == 1
    await asyncio.wait_for(cancelled.wait(), DEADLINE_S)


# -- 4. accepted, then a stall before any output -------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_stall_after_accepting_fails_over_invisibly(net: Net, stream: bool) -> None:
    cancelled = asyncio.Event()
    await net.executor(lambda node, raw: [accept_item(node, raw)], hang=True, cancelled=cancelled)
    x = await net.executor(answer())
    result = await run(net, stream, stall_timeout=0.5)
    assert_served_by(net, x, result, stream)
    assert net.attempts("accepted") == 2
    assert net.failovers("before_output") == 1 and net.failovers("mid_stream") == 0
    await asyncio.wait_for(cancelled.wait(), DEADLINE_S)


# -- 5. the connection dies after the accept -----------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_connection_lost_after_accepting_fails_over(net: Net, stream: bool) -> None:
    dying = await net.executor(lambda node, raw: [accept_item(node, raw)], hang=True)
    x = await net.executor(answer())
    task = asyncio.create_task(run(net, stream))
    await until(lambda: net.attempts("accepted") == 1 or task.done(), what="the first accept")
    await net.stop(dying)
    result = await asyncio.wait_for(task, DEADLINE_S)  # the lost connection noticed: no stall timeout fires
    assert_served_by(net, x, result, stream)
    assert net.attempts("accepted") == 2
    assert net.failovers("before_output") == 1


# -- 6. garbage ------------------------------------------------------------------------------------------


def _with_accept(*items: dict[str, Any]) -> Items:
    return lambda node, raw: [accept_item(node, raw), *items]


GARBAGE: dict[str, tuple[Items, str]] = {
    # name: (items, the attempt outcome it is counted under)
    "sse that is not an event": (_with_accept({"t": "sse", "d": "garbage GARBAGE\n\n"}), "accepted"),
    "sse whose data is not JSON": (_with_accept({"t": "sse", "d": "data: GARBAGE\n\n"}), "accepted"),
    "sse whose data is not an object": (_with_accept({"t": "sse", "d": 'data: ["GARBAGE"]\n\n'}), "accepted"),
    "sse cut inside an event": (_with_accept({"t": "sse", "d": 'data: {"GARBAGE": 1}'}), "accepted"),
    # The first event is valid, but it comes in the same sse item as garbage: none of it is relayed.
    "good event and garbage in one item": (
        _with_accept({"t": "sse", "d": chunk("GARBAGE") + "GARBAGE\n\n"}),
        "accepted",
    ),
    "sse whose choices are not a list": (
        _with_accept({"t": "sse", "d": 'data: {"choices": 7}\n\n'}),
        "accepted",
    ),
    "sse whose choice is not an object": (
        _with_accept({"t": "sse", "d": 'data: {"choices": ["GARBAGE"]}\n\n'}),
        "accepted",
    ),
    "sse whose delta is not an object": (
        _with_accept({"t": "sse", "d": 'data: {"choices": [{"index": 0, "delta": "GARBAGE"}]}\n\n'}),
        "accepted",
    ),
    "unknown item after the accept": (_with_accept({"t": "bogus", "d": "GARBAGE"}), "accepted"),
    "json item in a stream": (_with_accept({"t": "json", "d": '{"GARBAGE": 1}'}), "accepted"),
    "unknown first item": (lambda node, raw: [{"t": "bogus"}], "invalid"),
    "output before any accept": (lambda node, raw: [{"t": "sse", "d": chunk("GARBAGE")}], "invalid"),
    "accept without itself": (
        lambda node, raw: [{"t": "accept", "route": raw["route"]}, {"t": "sse", "d": chunk("GARBAGE")}],
        "invalid",
    ),
    "accept naming another first hop": (
        lambda node, raw: [
            {"t": "accept", "route": [*raw["route"], OTHER.node_id]},
            {"t": "sse", "d": chunk("GARBAGE")},
        ],
        "invalid",
    ),
    "accept not starting with the entry": (
        lambda node, raw: [{"t": "accept", "route": [node.id]}, {"t": "sse", "d": chunk("GARBAGE")}],
        "invalid",
    ),
    "accept with a malformed route": (lambda node, raw: [{"t": "accept", "route": "GARBAGE"}], "invalid"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
async def test_garbage_in_a_stream_never_reaches_the_app(net: Net, case: str) -> None:
    items, outcome = GARBAGE[case]
    await net.executor(items)
    x = await net.executor(answer())
    app, usage = await run(net, stream=True)
    assert "GARBAGE" not in app.text
    assert_served_by(net, x, (app, usage), stream=True)
    assert net.attempts(outcome) >= 1
    if outcome == "accepted":
        assert net.failovers("before_output") == 1


def _answered(text: str) -> Items:
    """A well-framed, well-signed whole answer whose content is `text`."""
    return lambda node, raw: [
        accept_item(node, raw),
        {"t": "json", "d": text},
        {"t": "receipt", "r": make_receipt(node.identity, raw, text)},
    ]


NON_STREAMED_GARBAGE: dict[str, Items] = {
    "choices that are not a list": _answered('{"choices": "GARBAGE"}'),
    "no choices": _answered('{"choices": [], "GARBAGE": 1}'),
    "a message that is not an object": _answered('{"choices": [{"index": 0, "message": "GARBAGE"}]}'),
    "an answer that is not JSON": lambda node, raw: [
        accept_item(node, raw),
        {"t": "json", "d": "GARBAGE"},
        {"t": "receipt", "r": make_receipt(node.identity, raw, "GARBAGE")},
    ],
    "an answer that is not an object": lambda node, raw: [
        accept_item(node, raw),
        {"t": "json", "d": '["GARBAGE"]'},
        {"t": "receipt", "r": make_receipt(node.identity, raw, '["GARBAGE"]')},
    ],
    "sse in a whole answer": _with_accept({"t": "sse", "d": chunk("GARBAGE")}),
    "two answers": _with_accept({"t": "json", "d": "{}"}, {"t": "json", "d": '{"GARBAGE": 1}'}),
    "a receipt that is not a record": _with_accept(
        {"t": "json", "d": '{"GARBAGE": 1}'}, {"t": "receipt", "r": 1}
    ),
    "an answer without a receipt": _with_accept({"t": "json", "d": '{"GARBAGE": 1}'}),
}


@pytest.mark.parametrize("case", list(NON_STREAMED_GARBAGE))
async def test_garbage_in_a_whole_answer_fails_over(net: Net, case: str) -> None:
    await net.executor(NON_STREAMED_GARBAGE[case])
    x = await net.executor(answer())
    result = await run(net, stream=False)
    assert_served_by(net, x, result, stream=False)
    assert net.failovers("before_output") == 1


# -- 7. bad receipts -------------------------------------------------------------------------------------


def _forged(node: OverlayNode, raw: dict[str, Any], text: str) -> dict[str, Any]:
    """The executor's receipt body, signed with another node's key."""
    body = make_receipt(node.identity, raw, text)["body"]
    return {"body": body, "sig": OTHER.sign(canonical(body)).hex()}


BAD_RECEIPTS: dict[str, Receipt] = {
    "signed by another node": lambda node, raw, text: make_receipt(OTHER, raw, text),
    "wrong response hash": lambda node, raw, text: make_receipt(node.identity, raw, text + " "),
    "wrong request hash": lambda node, raw, text: make_receipt(node.identity, {**raw, "id": "0" * 32}, text),
    "another entry": lambda node, raw, text: make_receipt(node.identity, raw, text, entry=OTHER.node_id),
    "another model": lambda node, raw, text: make_receipt(node.identity, raw, text, model="other"),
    "another network": lambda node, raw, text: make_receipt(node.identity, raw, text, net="cd" * 32),
}


@pytest.mark.parametrize("case", list(BAD_RECEIPTS))
async def test_a_bad_receipt_is_not_paid_and_the_next_candidate_serves(net: Net, case: str) -> None:
    bad = await net.executor(answer(("BAD",), receipt=BAD_RECEIPTS[case]))
    x = await net.executor(answer())
    result = await run(net, stream=False)
    assert_served_by(net, x, result, stream=False)
    assert bad.id not in net.paid_to()
    assert net.bad_receipts == 1
    assert net.failovers("before_output") == 1


async def test_a_forged_receipt_signature_is_not_paid(net: Net) -> None:
    bad = await net.executor(answer(("BAD",), receipt=_forged))
    x = await net.executor(answer())
    result = await run(net, stream=False)
    assert_served_by(net, x, result, stream=False)
    assert bad.id not in net.paid_to()
    assert net.failovers("before_output") == 1


async def test_a_forged_receipt_signature_is_counted(net: Net) -> None:
    await net.executor(answer(("BAD",), receipt=_forged))
    await net.executor(answer())
    await run(net, stream=False)
    assert net.bad_receipts == 1


async def test_completion_tokens_up_to_max_tokens_plus_one_are_accepted(net: Net) -> None:
    def receipt(node: OverlayNode, raw: dict[str, Any], text: str) -> dict[str, Any]:
        return make_receipt(node.identity, raw, text, completion_tokens=MAX_TOKENS + 1)

    x = await net.executor(answer(("a" * 40,), receipt=receipt))  # 40 bytes of text: room for the claim
    _, (_, _, usage) = await run(net, stream=False)
    assert net.paid_to() == [x.id] and usage.completion_tokens == MAX_TOKENS + 1
    assert net.bad_receipts == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_a_receipt_claiming_more_than_the_bytes_hold_is_paid_the_verified_part(
    net: Net, stream: bool
) -> None:
    """Claims beyond what the request and the answer can hold are paid at the bounds (not failed
    over: the answer itself is fine), counted, and the executor is avoided from then on."""

    def receipt(node: OverlayNode, raw: dict[str, Any], text: str) -> dict[str, Any]:
        return make_receipt(node.identity, raw, text, prompt_tokens=10**6, completion_tokens=MAX_TOKENS)

    x = await net.executor(answer(("Hi",), receipt=receipt))
    y = await net.executor(answer())
    delegator = net.delegator()  # one entry: it remembers whom it struck
    await run(net, stream=stream, delegator=delegator)
    assert net.paid_to() == [x.id]
    prompt, completion = net.ledger.paid[0]
    assert prompt < 2000  # the request as sent, plus a template's allowance
    assert completion <= 2 + 3 + 16  # "Hi", the events with a choice, a choice's special tokens
    assert net.count("wwwserve_bad_receipts_total", reason="inflated_receipt") == 1
    await run(net, stream=stream, delegator=delegator)
    assert net.paid_to()[-1] == y.id  # x is struck: avoided


async def test_a_bad_receipt_at_the_end_of_a_stream_is_not_paid(net: Net) -> None:
    x = await net.executor(answer(receipt=BAD_RECEIPTS["wrong response hash"]))
    seen: list[dict[str, Any]] = []
    await net.executor(answer(), seen=seen)
    app, _ = await run(net, stream=True)
    # The whole answer already reached the app: it ends normally, without a receipt comment.
    assert app.text == relayed("".join(stream_events(("Hel", "lo"))), app.text) + DONE
    assert app.headers[b"x-wwwserve-route"] == f"{net.me},{x.id}".encode()
    assert net.ledger.settled == [] and seen == []
    assert net.bad_receipts == 1


def _relayed_to_other(receipt_signer: Callable[[OverlayNode], NodeIdentity]) -> Items:
    """The peer accepts as a relay: the route names OTHER as the executor behind it."""

    def items(node: OverlayNode, raw: dict[str, Any]) -> list[dict[str, Any]]:
        text = answer_json("BAD")
        signer = receipt_signer(node)
        return [
            {"t": "accept", "route": [*raw["route"], node.id, OTHER.node_id]},
            {"t": "json", "d": text},
            {"t": "receipt", "r": make_receipt(signer, raw, text)},
        ]

    return items


async def test_a_relayed_answer_is_paid_to_the_last_node_of_the_route(net: Net) -> None:
    relay = await net.executor(_relayed_to_other(lambda node: OTHER))
    body, headers, _ = (await run(net, stream=False))[1]
    assert body == relayed_json(answer_json("BAD"), body)
    assert dict(headers)[b"x-wwwserve-route"] == f"{net.me},{relay.id},{OTHER.node_id}".encode()
    assert net.paid_to() == [OTHER.node_id] and net.bad_receipts == 0


async def test_a_relay_that_signs_for_the_executor_is_not_paid(net: Net) -> None:
    await net.executor(_relayed_to_other(lambda node: node.identity))
    x = await net.executor(answer())
    result = await run(net, stream=False)
    assert_served_by(net, x, result, stream=False)
    assert net.bad_receipts == 1


# -- 8. backend errors -------------------------------------------------------------------------------------


def _error(status: int) -> Items:
    text = error_body(
        "the prompt is too long", "invalid_request_error", "messages", "context_length_exceeded"
    )
    return _with_accept({"t": "error", "status": status, "d": text.decode()})


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_error_is_relayed_without_failover(net: Net, stream: bool) -> None:
    await net.executor(_error(400))
    seen: list[dict[str, Any]] = []
    await net.executor(answer(), seen=seen)
    app = App()
    delegator = net.delegator()
    body = chat(stream)
    with pytest.raises(UpstreamError) as raised:
        if stream:
            await delegator.stream(info_for(body), Endpoint.CHAT, body, app)
        else:
            await delegator.complete(info_for(body), Endpoint.CHAT, body)
    assert raised.value.status == 400
    assert raised.value.message == "the prompt is too long"
    assert raised.value.code == "context_length_exceeded" and raised.value.param == "messages"
    assert app.messages == [] and seen == []
    assert net.failovers("before_output") == 0 and net.ledger.settled == []


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("status", [500, 503])
async def test_a_server_error_fails_over(net: Net, stream: bool, status: int) -> None:
    await net.executor(_error(status))
    x = await net.executor(answer())
    result = await run(net, stream)
    assert_served_by(net, x, result, stream)
    assert net.failovers("before_output") == 1


# -- 9, 10. death mid-stream -----------------------------------------------------------------------------


def _two_then_hang(node: OverlayNode, raw: dict[str, Any]) -> list[dict[str, Any]]:
    return [accept_item(node, raw), {"t": "sse", "d": chunk("Hel")}, {"t": "sse", "d": chunk("lo")}]


async def _die_mid_stream(net: Net, body: dict[str, Any], first_items: Items = _two_then_hang) -> App:
    """Start a stream; once the app has the first executor's two events, stop that executor."""
    first = await net.executor(first_items, hang=True)
    net.order.remove(first.id)
    net.order.insert(0, first.id)
    app = App()
    delegator = net.delegator()
    task = asyncio.create_task(delegator.stream(info_for(body), Endpoint.CHAT, body, app))
    await until(lambda: len(app.bodies) == 2 or task.done(), what="two events relayed")
    assert not task.done()
    await net.stop(first)
    app.usage, receipts = await asyncio.wait_for(task, DEADLINE_S)  # noticed at once: no stall timeout fires
    for receipt in receipts:
        await delegator.pay(receipt)
    return app


async def test_a_death_mid_stream_continues_at_the_next_executor(net: Net) -> None:
    seen: list[dict[str, Any]] = []
    x = await net.executor(answer((" wor", "ld"), role_first=True, id="c2", created=2), seen=seen)
    body = chat(True)
    app = await _die_mid_stream(net, body)

    (cont,) = seen
    assert cont["continuation"] is True
    assert cont["route"] == [net.me]
    assert cont["body"]["messages"] == [*body["messages"], {"role": "assistant", "content": "Hello"}]
    assert cont["body"]["max_tokens"] == MAX_TOKENS - 2
    assert {k: v for k, v in cont["body"].items() if k not in ("messages", "max_tokens")} == {
        "model": MODEL,
        "stream": True,
    }

    # One answer: a single start (naming the first route), one id and created, no second role chunk.
    assert len(app.starts) == 1
    objects = app.objects()
    assert len({o["id"] for o in objects}) == 1 and {o["created"] for o in objects} == {1}
    assert contents(objects) == "Hello world"
    assert len(objects) == 5  # Hel, lo, " wor", ld, the finish chunk
    assert [o["choices"][0]["finish_reason"] for o in objects] == [None] * 4 + ["stop"]
    assert not any("role" in o["choices"][0]["delta"] for o in objects)
    assert app.text.endswith(DONE)
    assert f": wwwserve-route {net.me},{x.id}\n" in app.text

    assert net.paid_to() == [x.id]
    check_receipt(net.ledger.settled[0], NET)
    assert app.usage == Usage(PROMPT_TOKENS, 2, PROMPT_TOKENS + 2)
    assert net.failovers("mid_stream") == 1 and net.failovers("before_output") == 0


async def test_a_death_mid_stream_with_no_other_executor_ends_with_an_error_event(net: Net) -> None:
    app = await _die_mid_stream(net, chat(True))
    assert len(app.starts) == 1
    last = app.bodies[-1]
    assert last.startswith("data: ") and last.endswith("\n\n")
    error = json.loads(last[6:])["error"]
    assert error["type"] == "api_error" and "continue" in error["message"]
    # Like a local backend that breaks off: the error event ends the stream (no [DONE] after it).
    assert DONE not in app.text
    assert contents(app.objects()[:-1]) == "Hello"
    assert net.ledger.settled == []
    assert net.failovers("mid_stream") == 1


async def test_a_death_mid_stream_that_cannot_resume_ends_with_an_error_event(net: Net) -> None:
    seen: list[dict[str, Any]] = []
    await net.executor(answer(), seen=seen)
    app = await _die_mid_stream(net, chat(True, max_tokens=2))  # both tokens already sent
    assert seen == []
    error = json.loads(app.bodies[-1][6:])["error"]
    assert "cannot resume" in error["message"]
    assert DONE not in app.text and net.ledger.settled == []


async def test_a_death_after_the_last_event_ends_the_stream_unpaid(net: Net) -> None:
    def finished(node: OverlayNode, raw: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            accept_item(node, raw),
            {"t": "sse", "d": chunk("Hi")},
            {"t": "sse", "d": chunk(finish="stop")},
        ]

    seen: list[dict[str, Any]] = []
    await net.executor(answer(), seen=seen)
    app = await _die_mid_stream(net, chat(True), finished)
    assert app.text == relayed(chunk("Hi") + chunk(finish="stop"), app.text) + DONE
    assert seen == [] and net.ledger.settled == []
    assert net.failovers("mid_stream") == 1


# -- 11. continuation.py ----------------------------------------------------------------------------------


def read(endpoint: Endpoint, pieces: list[str]) -> AnswerReader:
    """A reader that relayed `pieces`, as an entry does (a refused piece relays nothing)."""
    reader = AnswerReader(endpoint, "e1", MODEL)
    for piece in pieces:
        with contextlib.suppress(MalformedAnswer):
            reader.events(piece)
    return reader


def test_progress_over_chat_events() -> None:
    pieces = [
        chunk(role="assistant", id="abc", created=7) + chunk("Hel", id="abc", created=7),
        ": a comment\n\n" + chunk("lo", id="abc", created=7),
        # refused whole: its text never reached the app
        chunk(" there", id="abc", created=7) + "data: not json\n\n",
        chunk("", id="abc", created=7) + chunk(" you", id="zzz", created=9),
    ]
    done = progress(NOTHING, read(Endpoint.CHAT, pieces))
    assert done == Progress("Hello you", 3, False, "e1", 7)
    assert progress(NOTHING, read(Endpoint.CHAT, [*pieces, chunk(finish="stop")])).finished is True


def test_progress_over_completion_events() -> None:
    reader = read(
        Endpoint.COMPLETION, [text_chunk("Once", id="t9", created=5), text_chunk(" upon", finish="length")]
    )
    assert progress(NOTHING, reader) == Progress("Once upon", 2, True, "e1", 5)


def test_progress_adds_a_continuation_to_what_came_before() -> None:
    before = Progress("Once", 1, False, "e1", 5)
    after = progress(before, read(Endpoint.COMPLETION, [text_chunk(" upon", created=8), text_chunk(" a")]))
    assert after == Progress("Once upon a", 3, False, "e1", 5)


def test_progress_of_nothing() -> None:
    assert progress(NOTHING, read(Endpoint.CHAT, [])) == Progress("", 0, False, "e1", None)
    assert progress(NOTHING, read(Endpoint.CHAT, [": ping\n\n"])) == Progress("", 0, False, "e1", None)


def test_continuation_of_a_chat() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    original = json.loads(json.dumps(body))
    resumed = continuation_body(Endpoint.CHAT, body, Progress("Hello", 2, False, "c1", 1))
    assert resumed == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}],
        "max_tokens": 8,
        "stream": True,
    }
    assert body == original  # not changed in place
    both = continuation_body(
        Endpoint.CHAT, {**body, "max_completion_tokens": 5}, Progress("Hello", 2, False, "c1", 1)
    )
    assert both is not None and both["max_tokens"] == 8 and both["max_completion_tokens"] == 3
    unbounded = continuation_body(
        Endpoint.CHAT, {"model": MODEL, "messages": []}, Progress("x", 1, False, None, None)
    )
    assert unbounded == {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}


def test_continuation_of_a_completion_with_a_string_prompt() -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4, "echo": True, "stream": True}
    resumed = continuation_body(Endpoint.COMPLETION, body, Progress(" upon", 1, False, "t", 1))
    assert resumed == {"model": MODEL, "prompt": "Once upon", "max_tokens": 3, "stream": True}


@pytest.mark.parametrize(
    ("endpoint", "body", "chunks"),
    [
        (Endpoint.COMPLETION, {"model": MODEL, "prompt": ["Once", "Twice"], "max_tokens": 9}, 1),
        (Endpoint.COMPLETION, {"model": MODEL, "prompt": [1, 2, 3]}, 1),
        (Endpoint.CHAT, {"model": MODEL, "messages": [], "n": 2}, 1),
        (Endpoint.CHAT, {"model": MODEL, "messages": [], "max_tokens": 3}, 3),
        (Endpoint.CHAT, {"model": MODEL, "messages": [], "max_completion_tokens": 2}, 5),
        (Endpoint.CHAT, {"model": MODEL, "messages": "hi"}, 1),
        (Endpoint.EMBEDDING, {"model": MODEL, "input": "x"}, 1),
    ],
    ids=[
        "list prompt",
        "token prompt",
        "n=2",
        "max_tokens used up",
        "over max_completion_tokens",
        "bad messages",
        "embeddings",
    ],
)
def test_no_continuation(endpoint: Endpoint, body: dict[str, Any], chunks: int) -> None:
    assert continuation_body(endpoint, body, Progress("x" * chunks, chunks, False, "c", 1)) is None


_content = st.text(max_size=12)
_batches = st.lists(st.lists(st.one_of(st.none(), _content), max_size=5), max_size=5)


@settings(max_examples=150, deadline=None)
@given(
    original=st.text(min_size=1, max_size=16),
    created=st.integers(0, 2**40),
    theirs=st.text(max_size=16),
    batches=_batches,
    finish=st.booleans(),
)
def test_stitched_events_parse_and_carry_the_original_id(
    original: str, created: int, theirs: str, batches: list[list[str | None]], finish: bool
) -> None:
    stitch = Stitcher(Progress("so far", 2, False, original, created))
    role = chunk(role="assistant", id=theirs, created=created + 5)
    payloads = [
        "".join(role if p is None else chunk(p, id=theirs, created=created + 5) for p in batch)
        for batch in batches
    ]
    if finish:
        payloads.append(chunk(finish="stop", id=theirs, created=created + 5))
    payloads = [p for p in payloads if p]  # an sse item holds at least one event
    out = "".join(stitch(p) for p in payloads)
    events = out.split("\n\n")
    assert events[-1] == ""
    objects = []
    for event in events[:-1]:
        assert event.startswith("data: ")
        obj = json.loads(event[6:])
        assert obj["id"] == original and obj["created"] == created
        objects.append(obj)
    # Role-only chunks (and empty deltas) are dropped; every piece of text stays, in order.
    texts = [p for batch in batches for p in batch if p]
    assert [
        o["choices"][0]["delta"].get("content") for o in objects if not o["choices"][0]["finish_reason"]
    ] == texts
    assert progress(NOTHING, read(Endpoint.CHAT, [out])).text == "".join(texts)
    assert progress(NOTHING, read(Endpoint.CHAT, [out])).finished is finish


def test_stitcher_without_an_id_keeps_the_events_own() -> None:
    out = Stitcher(Progress("", 0, False, None, None))(chunk("a", id="x", created=3))
    assert json.loads(out[6:])["id"] == "x" and json.loads(out[6:])["created"] == 3


# -- 12. wire.parse_request --------------------------------------------------------------------------------

_ME = NodeIdentity.generate().node_id
_SENDER = NodeIdentity.generate().node_id
_ENTRY = NodeIdentity.generate().node_id


def _ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def _raw(**change: Any) -> dict[str, Any]:
    raw = {
        "id": "a" * 32,
        "endpoint": "chat/completions",
        "body": {"model": MODEL, "messages": []},
        "route": [_ENTRY, _SENDER],
        "continuation": False,
    }
    raw.update(change)
    return raw


def test_a_valid_request_parses() -> None:
    req = wire.parse_request(_SENDER, _ME, _raw(continuation=True))
    assert req == wire.DelegatedRequest(
        "a" * 32, Endpoint.CHAT, {"model": MODEL, "messages": []}, (_ENTRY, _SENDER), True
    )
    assert req.entry == _ENTRY
    assert req.to_wire() == _raw(continuation=True)
    longest = [*_ids(wire.MAX_HOPS - 2), _SENDER]  # with this node it is MAX_HOPS long
    assert wire.parse_request(_SENDER, _ME, _raw(route=longest)).route == tuple(longest)


def _without(key: str) -> dict[str, Any]:
    raw = _raw()
    del raw[key]
    return raw


REFUSALS: dict[str, tuple[Any, str]] = {
    "not an object": ([], "is {id"),
    "missing key": (_without("continuation"), "is {id"),
    "extra key": (_raw(extra=1), "is {id"),
    "short id": (_raw(id="a" * 31), "32 hex"),
    "upper-case id": (_raw(id="A" * 32), "32 hex"),
    "non-hex id": (_raw(id="g" * 32), "32 hex"),
    "numeric id": (_raw(id=123), "32 hex"),
    "unknown endpoint": (_raw(endpoint="images/generations"), "unknown endpoint"),
    "endpoint with a slash": (_raw(endpoint="/v1/chat/completions"), "unknown endpoint"),
    "body without a model": (_raw(body={"messages": []}), "model"),
    "body not an object": (_raw(body="hi"), "model"),
    "route not ending with the sender": (_raw(route=[_SENDER, _ENTRY]), "end with the node that sent"),
    "route of the entry only": (_raw(route=[_ENTRY]), "end with the node that sent"),
    "loop": (_raw(route=[_ENTRY, _ME, _SENDER]), "loop"),
    "loop through the entry": (_raw(route=[_ME, _SENDER]), "loop"),
    "too many hops": (_raw(route=[*_ids(wire.MAX_HOPS - 1), _SENDER]), "longer than"),
    "far too many hops": (_raw(route=[*_ids(wire.MAX_HOPS), _SENDER]), "1 to"),
    "duplicate node": (_raw(route=[_ENTRY, _ENTRY, _SENDER]), "twice"),
    "duplicate sender": (_raw(route=[_SENDER, _ENTRY, _SENDER]), "twice"),
    "empty route": (_raw(route=[]), "1 to"),
    "route not a list": (_raw(route=_SENDER), "1 to"),
    "route entry not a node id": (_raw(route=[_ENTRY.upper(), _SENDER]), "node ids"),
    "string continuation": (_raw(continuation="true"), "boolean"),
    "numeric continuation": (_raw(continuation=1), "boolean"),
    "null continuation": (_raw(continuation=None), "boolean"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_parse_request_refuses(case: str) -> None:
    raw, message = REFUSALS[case]
    with pytest.raises(wire.WireError, match=message.replace("{", r"\{")):
        wire.parse_request(_SENDER, _ME, raw)


@pytest.mark.parametrize(
    "item",
    [
        None,
        {"t": "nope"},
        {"t": "sse", "d": "data: {}\n"},
        {"t": "sse", "d": b"data: {}\n\n"},
        {"t": "json", "d": {"id": 1}},
        {"t": "accept", "route": []},
        {"t": "error", "status": 200, "d": "x"},
        {"t": "error", "status": 600, "d": "x"},
        {"t": "error", "status": True, "d": "x"},
        {"t": "error", "status": 400, "d": None},
    ],
)
def test_check_item_refuses_malformed_items(item: Any) -> None:
    with pytest.raises(wire.WireError):
        wire.check_item(item)


def test_check_item_payloads() -> None:
    assert wire.check_item({"t": "decline", "reason": 3}) == ("decline", "")
    assert wire.check_item({"t": "error", "status": 429, "d": "{}"}) == ("error", (429, "{}"))
    assert wire.check_item(wire.accept((_ENTRY, _SENDER))) == ("accept", (_ENTRY, _SENDER))
    assert wire.check_item({"t": "receipt", "r": {"a": 1}}) == ("receipt", {"a": 1})
