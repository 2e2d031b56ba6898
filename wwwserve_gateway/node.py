"""A node: the config, the backends, the HTTP app, and their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from wwwserve_gateway.backend_registry import BackendRegistry, validate_backend_params
from wwwserve_gateway.config.loading import load_config
from wwwserve_gateway.config.problems import ConfigError, ConfigProblem
from wwwserve_gateway.config.schema import GatewayConfig, ModelEntry
from wwwserve_gateway.delegation.entry import Delegator
from wwwserve_gateway.delegation.executor import PeerExecutor
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.dispatch import Dispatcher
from wwwserve_gateway.http.app import create_app
from wwwserve_gateway.http.auth import KeyCheck
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.network.wiring import NodeNetwork
from wwwserve_gateway.openai.serving import OpenAIServing
from wwwserve_gateway.plugin_api.backend import Backend, BackendContext

log = structlog.get_logger(__name__)


class Node:
    def __init__(self, config: GatewayConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        settings = config.node
        self.metrics = GatewayMetrics()
        self.registry = BackendRegistry(BackendContext(settings.data_dir, settings.request_timeout))
        self.keys = KeyCheck(settings.api_keys)
        self.serving = OpenAIServing(self.registry, self.metrics)
        self.network = NodeNetwork(config, self.registry, self.metrics)
        api = self.network.api
        delegation_metrics = DelegationMetrics(self.metrics.registry)
        delegator = Delegator(api, delegation_metrics, settings.request_timeout)
        self.executor = PeerExecutor(api, self.registry, delegator, delegation_metrics)
        self.dispatcher = Dispatcher(
            api, self.serving, delegator, self.metrics, delegation_metrics, settings.request_timeout
        )
        self.app = create_app(self)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.config.node.data_dir.mkdir(parents=True, exist_ok=True)
        for entry in self.config.model_list:
            await self.registry.add(entry)
        poll = self.registry.poll_loads(self.config.node.load_poll_interval, self.metrics.observe_backend)
        self._tasks.append(asyncio.create_task(poll))
        await self.network.start()
        log.info("node started", models=self.registry.model_names())

    async def stop(self) -> None:
        # uvicorn has drained the HTTP requests by now: leave the network, then stop the backends.
        await self.network.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.registry.aclose()
        log.info("node stopped")

    @contextlib.asynccontextmanager
    async def lifespan(self, app) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def add_backend(self, entry: ModelEntry) -> Backend:
        problems = validate_backend_params(entry, ("litellm_params",))
        if problems:
            raise ConfigError("backend", problems)
        backend = await self.registry.add(entry)
        log.info("backend added", backend=backend.id)
        return backend

    async def remove_backend(self, deployment_id: str) -> None:
        backend = await self.registry.remove(deployment_id)
        self.metrics.forget_backend(backend)
        log.info("backend removed", backend=deployment_id)

    async def reload(self) -> tuple[list[str], list[str]]:
        """Re-read model_list from the config file: start new deployments, stop dropped ones.

        A deployment whose entry changed is replaced. Other sections take effect on restart only.
        """
        if self.config_path is None:
            raise ConfigError("reload", [ConfigProblem((), "the node was started without a config file")])
        fresh = load_config(self.config_path)
        wanted = {e.deployment_id: e for e in fresh.model_list}
        running = {b.id: b.entry for b in self.registry}
        removed = [i for i, e in running.items() if wanted.get(i) != e]
        added = [i for i, e in wanted.items() if running.get(i) != e]
        for deployment_id in removed:
            await self.remove_backend(deployment_id)
        for deployment_id in added:
            await self.add_backend(wanted[deployment_id])
        self.config = self.config.model_copy(update={"model_list": fresh.model_list})
        return added, removed
