"""The network genesis: one YAML file of network parameters whose canonical hash is the network id.

Nodes whose genesis differs in any value have different network ids and refuse each other's
handshakes, so nodes with different rules never mix.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wwwserve_gateway.config.problems import ConfigError, ConfigProblem, problems_from_validation
from wwwserve_gateway.network.canonical import digest
from wwwserve_gateway.network.identity import NODE_ID


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GossipParams(_Strict):
    interval_s: float = Field(1.0, gt=0, description="seconds between gossip rounds")
    fanout: int = Field(3, ge=1, description="peers contacted per round")
    probe_timeout_s: float = Field(0.5, gt=0, description="seconds to wait for a probe's answer")
    indirect_probes: int = Field(3, ge=0, description="peers asked to probe a silent member on our behalf")
    suspect_timeout_s: float = Field(
        3.0, gt=0, description="seconds a suspect member has to refute before it is declared dead"
    )
    refresh_s: float = Field(
        30.0, gt=0, description="seconds between re-publications of a node's own record (heartbeat)"
    )
    tombstone_ttl_s: float = Field(
        300.0,
        gt=0,
        description="seconds a dead or departed id is remembered so it cannot come back as a ghost",
    )
    max_piggyback: int = Field(16, ge=1, description="record updates carried per gossip message")
    retransmit_mult: int = Field(
        2, ge=1, description="a node relays each update retransmit_mult * ceil(log2(N + 1)) times"
    )
    # Anti-entropy repairs what piggybacking missed (records whose retransmit budget ran out while the
    # network was still small); its digest is constant-size, so syncing often stays flat in N.
    sync_every_rounds: int = Field(
        3, ge=1, description="rounds between push-pull anti-entropy syncs with one random member"
    )


class DuelParams(_Strict):
    """Duel-and-judge: how often delegated requests are served twice and judged, and what moves."""

    rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of delegated requests an entry node also sends to a second executor",
    )
    judges: int = Field(3, ge=1, le=15, description="judges asked per duel")
    judge_timeout_s: float = Field(
        60.0, gt=0, description="seconds a judge has to answer; a judge that does not answer abstains"
    )
    canary_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description="chance, per delegated request, that its entry also sends a duel with a known answer",
    )
    gamma: float = Field(
        0.1,
        ge=0,
        le=1,
        description="fraction of the stake a duel's loser committed that moves to the winner (capped by its bond)",
    )
    judge_price: float = Field(0.2, ge=0, description="credits the entry pays each judge that votes")
    commit_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of its bond an executor puts at risk in a duel at least, whatever its receipt says",
    )
    minority_slash: float = Field(
        0.05,
        ge=0,
        le=1,
        description="fraction of a judge's bonded stake moved to the majority judges when it voted against the outcome",
    )
    abstain_slash: float = Field(
        0.01,
        ge=0,
        le=1,
        description="fraction of a judge's bonded stake moved to the majority judges when it abstained",
    )
    rating_k: float = Field(16.0, ge=0, description="Elo K-factor of the quality score per duel")


class LedgerParams(_Strict):
    allocations: dict[str, int] = Field(
        default_factory=dict,
        description="credits each listed node id receives with its join operation; every other key gets 0",
    )
    price_per_request: float = Field(
        1.0, ge=0, description="credits an entry node pays per delegated request"
    )
    price_per_1k_tokens: float = Field(
        0.0, ge=0, description="credits paid per 1,000 tokens (prompt + completion)"
    )
    max_price_per_request: float = Field(
        100.0, gt=0, description="the most one request can cost, whatever its receipt claims"
    )
    unbonding_delay_s: float = Field(
        3600.0,
        ge=0,
        description="seconds before unbonded stake is liquid again (penalties still apply meanwhile)",
    )
    fraud_slash_fraction: float = Field(
        1.0, ge=0, le=1, description="fraction of an equivocating node's bonded and unbonding stake destroyed"
    )
    payment_batch_window_s: float = Field(
        5.0, gt=0, description="seconds an entry node gathers receipts before paying them in one operation"
    )
    payment_batch_max: int = Field(100, ge=1, description="receipts paid at most by one pay operation")
    duels: DuelParams = Field(default_factory=DuelParams)

    @field_validator("allocations")
    @classmethod
    def _node_ids(cls, allocations: dict[str, int]) -> dict[str, int]:
        for node_id, credits in allocations.items():
            if not NODE_ID.fullmatch(node_id):
                raise ValueError(f"{node_id!r} is not a node id (64 lowercase hex: `wwwserve keys show`)")
            if credits < 0:
                raise ValueError(f"the allocation of {node_id[:16]} is negative")
        return allocations


class NetworkGenesis(_Strict):
    name: str = Field("wwwserve-local", min_length=1, description="a human-readable network name")
    version: int = Field(1, ge=1, description="protocol version of this network")
    gossip: GossipParams = Field(default_factory=GossipParams)
    ledger: LedgerParams = Field(default_factory=LedgerParams)

    @property
    def network_id(self) -> str:
        return digest(self.model_dump(mode="json"))


def load_genesis(path: str | Path) -> NetworkGenesis:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem((), f"cannot read the file: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [ConfigProblem((), f"not valid YAML: {exc}")]) from None
    try:
        return NetworkGenesis.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(str(path), problems_from_validation(exc, NetworkGenesis)) from None


def write_genesis(genesis: NetworkGenesis, path: Path) -> None:
    header = f"# WWW.Serve network genesis. Network id (sha256 of the canonical form): {genesis.network_id}\n"
    path.write_text(header + yaml.safe_dump(genesis.model_dump(mode="json"), sort_keys=True))
