"""What the dashboard reads, handed over by the HTTP app: typed views of the node's services."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from wwwserve_gateway.plugin_api.backend import Backend
from wwwserve_gateway.plugin_api.node import NodeAPI


class RequestRecordLike(Protocol):
    """One finished app request (`wwwserve_gateway.access.RequestRecord`)."""

    @property
    def id(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def deployment(self) -> str | None: ...
    @property
    def route(self) -> Sequence[str]: ...
    @property
    def status(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def ttft_s(self) -> float | None: ...
    @property
    def error(self) -> str | None: ...


class RequestLog(Protocol):
    """The node's recent app requests (`wwwserve_gateway.access.RequestRecords`)."""

    def recent(self, limit: int | None = None) -> Sequence[RequestRecordLike]: ...


@dataclass(frozen=True)
class DashboardSources:
    node: NodeAPI
    backends: Iterable[Backend]
    requests: RequestLog | None
    operator_keys: tuple[str, ...]  # the operator keys and the admin key: who may open /ui
    started_at: float  # wall time the node was built
