"""An app's request on its way through the node: made once by its route, handed down the path
(route -> dispatcher -> local serving or delegation -> backend)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from wwwserve_gateway.http.asgi import Receive, Send
from wwwserve_gateway.plugin_api.backend import Endpoint
from wwwserve_gateway.plugin_api.requests import RequestInfo


@dataclass(slots=True)
class AppRequest:
    endpoint: Endpoint
    body: dict[str, Any]  # validated; forwarded as it is (backends may rewrite `model`)
    stream: bool
    started: float  # time.perf_counter() at arrival
    receive: Receive
    send: Send
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the same on every hop
    # Filled in on the way, for the access log (access.RequestRecord):
    deployment: str | None = None  # the local deployment that answered
    route: tuple[str, ...] = ()  # node ids that served it, this node first
    ttft: float | None = None  # seconds from arrival to the first streamed byte

    @property
    def model(self) -> str:
        return self.body["model"]

    def info(self) -> RequestInfo:
        """What the policy and the router see of it."""
        return RequestInfo.describe(self.id, self.endpoint.value, self.body, self.stream)
