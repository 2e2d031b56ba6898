"""One executor's answer to a delegated request, as the entry receives it, and how it can fail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from wwwserve_gateway.delegation import wire
from wwwserve_gateway.overlay.errors import OverlayError, PeerTimeout
from wwwserve_gateway.tracing import NO_SPAN, Span


class NoExecutor(Exception):
    """No candidate accepted the request."""


class ExecutorFailed(Exception):
    """The executor broke off, stalled, sent something malformed or failed with a server error."""


class ExecutorStalled(ExecutorFailed):
    """The executor went silent past the stall deadline (not even a heartbeat)."""


@dataclass
class Execution:
    """A request an executor accepted: its items after the accept."""

    peer: str  # the first hop, which this node asked
    route: tuple[str, ...]  # the whole route, executor last
    request: wire.DelegatedRequest
    items: AsyncIterator[dict[str, Any]]
    span: Span = NO_SPAN  # the delegation attempt's, ended with the execution

    @property
    def executor(self) -> str:
        return self.route[-1]

    async def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        try:
            async for item in self.items:
                kind, payload = wire.check_item(item)
                if kind != "wait":  # a heartbeat only keeps the stall deadline away
                    yield kind, payload
        except (PeerTimeout, TimeoutError) as exc:
            raise ExecutorStalled(f"{self.executor[:16]}: {exc}") from None
        except (OverlayError, wire.WireError) as exc:
            raise ExecutorFailed(f"{self.executor[:16]}: {exc}") from None

    async def aclose(self) -> None:
        try:
            await self.items.aclose()  # type: ignore[attr-defined]
        finally:
            self.span.end()
