"""The router slot: which peers to try for a delegated request."""

from __future__ import annotations

from abc import ABC, abstractmethod

from wwwserve_gateway.plugin_api.base import Plugin
from wwwserve_gateway.plugin_api.requests import RequestInfo


class Router(Plugin, ABC):
    """Executor choice. The node tries the candidates in order: a decline, a timeout or a dead
    connection moves on to the next."""

    @abstractmethod
    def candidates(self, request: RequestInfo) -> list[str]:
        """Peer ids, best first (`request.route` and `request.avoid` must be left out)."""
