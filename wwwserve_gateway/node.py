"""A node: the composition root. It builds the services, the plugins and the HTTP app from the
config, hands each part exactly what it uses, and runs their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from wwwserve_gateway.backend_registry import BackendRegistry
from wwwserve_gateway.config.loading import load_config
from wwwserve_gateway.config.problems import ConfigError, ConfigProblem
from wwwserve_gateway.config.schema import GatewayConfig, ModelEntry
from wwwserve_gateway.delegation.entry import Delegator
from wwwserve_gateway.delegation.executor import PeerExecutor
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.dispatch import Dispatcher
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.network.genesis import NetworkGenesis, load_genesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.offer import BackendOffer
from wwwserve_gateway.openai.serving import LocalServing
from wwwserve_gateway.overlay.overlay import Overlay
from wwwserve_gateway.plugin_api.backend import Backend, BackendContext
from wwwserve_gateway.plugin_api.base import Plugin
from wwwserve_gateway.plugin_api.loading import build_plugin, check_backend, check_plugins, require_valid
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.slots import NODE_SLOTS
from wwwserve_gateway.web.app import AppParts, create_app

log = structlog.get_logger(__name__)

# Load goes into the gossip record at most this many gossip rounds apart (see BackendOffer).
LOAD_PUBLISH_ROUNDS = 5


class Node:
    def __init__(self, config: GatewayConfig, config_path: Path | None = None) -> None:
        require_valid(config, str(config_path or "config"))
        self.config = config
        self.config_path = config_path
        settings = config.node
        self.metrics = GatewayMetrics()
        self.registry = BackendRegistry(BackendContext(settings.data_dir, settings.request_timeout))
        identity = NodeIdentity.load_or_create(settings.data_dir)
        genesis = load_genesis(settings.network) if settings.network else NetworkGenesis()
        self.api = NodeAPI(
            identity=identity,
            genesis=genesis,
            overlay=Overlay(identity, genesis.network_id, registry=self.metrics.registry),
            backends=self.registry,
            metrics=self.metrics.registry,
            public_url=settings.public_url or f"http://{settings.host}:{settings.port}",
            bootstrap=tuple(settings.bootstrap),
            data_dir=settings.data_dir,
        )
        self.plugins: dict[str, Plugin] = {
            slot.name: build_plugin(slot, getattr(config, slot.name), self.api) for slot in NODE_SLOTS
        }
        self.api.bind(**self.plugins)
        delegation_metrics = DelegationMetrics(self.metrics.registry)
        delegator = Delegator(self.api, delegation_metrics, settings.request_timeout)
        self.executor = PeerExecutor(self.api, self.registry, delegator, delegation_metrics)
        self.dispatcher = Dispatcher(
            self.api,
            self.registry,
            LocalServing(self.registry, self.metrics),
            delegator,
            self.metrics,
            delegation_metrics,
            settings.request_timeout,
        )
        self.app = create_app(
            AppParts(settings, self.dispatcher, self.registry, self.metrics, self, self.api, self.lifespan)
        )
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def node_id(self) -> str:
        return self.api.node_id

    async def start(self) -> None:
        self.config.node.data_dir.mkdir(parents=True, exist_ok=True)
        for entry in self.config.model_list:
            await self.registry.add(entry)
        poll = self.registry.poll_loads(self.config.node.load_poll_interval, self.metrics.observe_backend)
        self._tasks.append(asyncio.create_task(poll))
        self.executor.register()
        load_every = LOAD_PUBLISH_ROUNDS * self.api.genesis.gossip.interval_s
        self.api.gossip.add_delegate("offer", BackendOffer(self.registry, self.api.policy, load_every))
        self.api.gossip.add_delegate("policy", self.api.policy)
        for slot in NODE_SLOTS:
            await self.plugins[slot.name].start()
        log.info(
            "joined the network",
            node_id=self.node_id,
            network=self.api.genesis.network_id[:16],
            bootstrap=list(self.api.bootstrap),
            models=self.registry.model_names(),
        )

    async def stop(self) -> None:
        # uvicorn has drained the HTTP requests by now: leave the network, then stop the backends.
        for slot in reversed(NODE_SLOTS):
            await self.plugins[slot.name].stop()
        await self.api.overlay.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.registry.aclose()
        log.info("node stopped")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    # -- the admin API's view of the node (web.admin.BackendAdmin) --------------------------------
    def backends(self) -> list[Backend]:
        return list(self.registry)

    async def add_backend(self, entry: ModelEntry) -> Backend:
        problems = check_backend(entry, ("litellm_params",))
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
        fresh = load_config(self.config_path, checks=(check_plugins,))
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
