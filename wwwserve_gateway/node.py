"""A node: the composition root. It builds the services, the plugins and the HTTP app from the
config, hands each part exactly what it uses, and runs their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from wwwserve_gateway.access import RequestRecords
from wwwserve_gateway.config.loading import load_config
from wwwserve_gateway.config.problems import ConfigError, ConfigProblem
from wwwserve_gateway.config.schema import GatewayConfig, ModelEntry
from wwwserve_gateway.datadir import DataDirLock
from wwwserve_gateway.delegation.duels import DuelMetrics, Duels
from wwwserve_gateway.delegation.entry import Delegator
from wwwserve_gateway.delegation.executor import PeerExecutor
from wwwserve_gateway.delegation.judging import JudgeService
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.delegation.wire import STALL_S
from wwwserve_gateway.deployments import Deployments
from wwwserve_gateway.dispatch import Dispatcher
from wwwserve_gateway.http.cors import with_cors
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
from wwwserve_gateway.plugin_api.peers import MembershipEvent, MembershipEventKind
from wwwserve_gateway.plugin_api.slots import NODE_SLOTS
from wwwserve_gateway.tracing import build as build_tracing
from wwwserve_gateway.web.app import AppParts, create_app

log = structlog.get_logger(__name__)

# Load goes into the gossip record at most this many gossip rounds apart (see BackendOffer).
LOAD_PUBLISH_ROUNDS = 5
PEER_DRAIN_S = 30.0  # at most this long on a graceful stop for peers' requests being served
LEDGER_DRAIN_S = 5.0  # at most this long on a graceful stop to pay debts and hand the ledger over


class Node:
    def __init__(self, config: GatewayConfig, config_path: Path | None = None) -> None:
        require_valid(config, str(config_path or "config"))
        for warning in config.warnings:  # keys accepted without effect (a LiteLLM config's)
            log.warning("config key has no effect", key=warning.key, reason=warning.reason)
        self.config = config
        self.config_path = config_path
        settings = config.node
        self.data_dir_lock = DataDirLock(settings.data_dir)  # first: before the identity or ledger opens
        self.metrics = GatewayMetrics()
        self.deployments = Deployments(
            BackendContext(settings.data_dir, settings.request_timeout), config.router_settings
        )
        identity = NodeIdentity.load_or_create(settings.data_dir)
        genesis = load_genesis(settings.network) if settings.network else NetworkGenesis()
        self.api = NodeAPI(
            identity=identity,
            genesis=genesis,
            overlay=Overlay(
                identity,
                genesis.network_id,
                metrics=self.metrics.prometheus,
                handshake_timeout=settings.overlay_handshake_timeout,
                max_handshakes=settings.overlay_max_handshakes,
                max_handshakes_per_source=settings.overlay_handshakes_per_source,
                stream_window=settings.overlay_stream_window_bytes,
                connection_window=settings.overlay_connection_window_bytes,
            ),
            backends=self.deployments,
            metrics=self.metrics.prometheus,
            public_url=settings.public_url or f"http://{settings.host}:{settings.port}",
            bootstrap=tuple(settings.bootstrap),
            data_dir=settings.data_dir,
        )
        self.plugins: dict[str, Plugin] = {
            slot.name: build_plugin(slot, getattr(config, slot.name), self.api) for slot in NODE_SLOTS
        }
        self.api.bind(**self.plugins)
        delegation_metrics = DelegationMetrics(self.metrics.prometheus)
        self.duels = Duels(self.api, DuelMetrics(self.metrics.prometheus))
        self.judging = JudgeService(self.api)
        self.tracing = build_tracing(settings.otel, identity.node_id)  # node.otel unset: no-ops
        delegator = Delegator(
            self.api,
            delegation_metrics,
            min(STALL_S, settings.request_timeout),
            duels=self.duels,
            tracing=self.tracing,
        )
        self.executor = PeerExecutor(self.api, self.deployments, delegator, delegation_metrics)
        self.requests = RequestRecords(  # recent requests and the access log
            access_log=settings.access_log and settings.log_level in ("debug", "info"),
            log_format=settings.log_format,
        )
        self.dispatcher = Dispatcher(
            self.api,
            self.deployments,
            LocalServing(self.deployments, self.metrics),
            delegator,
            self.metrics,
            delegation_metrics,
            settings.request_timeout,
            self.requests,
        )
        app = create_app(
            AppParts(
                settings,
                self.dispatcher,
                self.deployments,
                self.metrics,
                self,
                self.api,
                self.lifespan,
                requests=self.requests,
            )
        )
        self.app = with_cors(app, settings)  # node.cors_*: none configured, none added
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def node_id(self) -> str:
        return self.api.node_id

    async def start(self) -> None:
        self.config.node.data_dir.mkdir(parents=True, exist_ok=True)
        for entry in self.config.model_list:
            await self.deployments.add(entry)
        poll = self.deployments.poll_loads(self.config.node.load_poll_interval, self.metrics.observe_backend)
        self._tasks.append(asyncio.create_task(poll))
        self.executor.register()
        self.judging.register()
        load_every = LOAD_PUBLISH_ROUNDS * self.api.genesis.gossip.interval_s
        self.api.gossip.add_delegate("offer", BackendOffer(self.deployments, self.api.policy, load_every))
        self.api.gossip.add_delegate("policy", self.api.policy)
        self.api.gossip.subscribe(self._on_membership)
        for slot in NODE_SLOTS:
            await self.plugins[slot.name].start()
        log.info(
            "node started",
            node_id=self.node_id,
            network=self.api.genesis.network_id[:16],
            bootstrap=list(self.api.bootstrap),
            models=self.deployments.model_names(),
        )

    async def stop(self) -> None:
        # uvicorn has drained the HTTP requests by now. Settle and hand the ledger over while the
        # peers are still connected, then leave the network, then stop the backends.
        await self.duels.aclose()  # duels not yet judged are dropped; answers received are paid
        # Peers' requests being served finish first (with their receipts); new ones are declined.
        unfinished = await self.executor.drain(min(self.config.node.request_timeout, PEER_DRAIN_S))
        if unfinished:
            log.warning("stopped with peers' requests unfinished", requests=unfinished)
        await self.api.ledger.drain(LEDGER_DRAIN_S)
        for slot in reversed(NODE_SLOTS):
            await self.plugins[slot.name].stop()
        await self.api.overlay.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.deployments.aclose()
        self.data_dir_lock.release()
        self.tracing.close()  # exports the spans still batched
        log.info("node stopped")

    def _on_membership(self, event: MembershipEvent) -> None:
        # Declared dead: its delegated streams fail over now instead of waiting out the stall
        # deadline. A suspicion alone is a hint (a starved machine misses probe deadlines while it
        # still streams), and cutting there would redo whole answers; a peer that is really frozen
        # is dead a suspicion timeout later. A peer that left gracefully finishes what it serves
        # first (see stop).
        if event.kind is MembershipEventKind.DEAD:
            self.api.overlay.drop(event.peer.id, f"membership: {event.kind.value}")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    # -- the admin API's view of the node (web.admin.BackendAdmin) --------------------------------
    def backends(self) -> list[Backend]:
        return list(self.deployments)

    async def add_backend(self, entry: ModelEntry) -> Backend:
        problems = check_backend(entry, ("litellm_params",))
        if problems:
            raise ConfigError("backend", problems)
        backend = await self.deployments.add(entry)
        log.info("backend added", backend=backend.id)
        return backend

    async def remove_backend(self, deployment_id: str) -> None:
        backend = await self.deployments.remove(deployment_id)
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
        running = {b.id: b.entry for b in self.deployments}
        removed = [i for i, e in running.items() if wanted.get(i) != e]
        added = [i for i, e in wanted.items() if running.get(i) != e]
        for deployment_id in removed:
            await self.remove_backend(deployment_id)
        for deployment_id in added:
            await self.add_backend(wanted[deployment_id])
        self.config = self.config.model_copy(update={"model_list": fresh.model_list})
        return added, removed
