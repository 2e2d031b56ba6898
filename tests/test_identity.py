"""Node identity, signed records and the network genesis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import GossipParams, NetworkGenesis, load_genesis, write_genesis
from wwwserve_gateway.network.identity import KEY_FILE, InvalidSignature, NodeIdentity, verify_record


def test_identity_is_created_owner_only_and_reloaded(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert NodeIdentity.load_or_create(tmp_path).node_id == first.node_id
    assert len(first.node_id) == 64


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    NodeIdentity.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        NodeIdentity.load_or_create(tmp_path)


def test_signed_record_round_trip_and_tampering() -> None:
    me = NodeIdentity.generate()
    record = me.sign_record({"id": me.node_id, "kind": "alive", "n": 1})
    assert verify_record(record)["n"] == 1
    altered = {"body": {**record["body"], "n": 2}, "sig": record["sig"]}
    with pytest.raises(InvalidSignature):
        verify_record(altered)
    other = NodeIdentity.generate()
    stolen = {"body": {**record["body"], "id": other.node_id}, "sig": record["sig"]}
    with pytest.raises(InvalidSignature):
        verify_record(stolen)
    with pytest.raises(ValueError):
        me.sign_record({"id": other.node_id})


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {},
        {"body": {}},
        {"body": {"id": 5}, "sig": ""},
        {"body": {"id": "zz"}, "sig": "zz"},
        {"body": {"id": "ab"}, "sig": "00"},
        {"body": {"id": "a" * 64}, "sig": "00" * 64, "x": 1},
    ],
)
def test_malformed_records_are_rejected(bad) -> None:
    with pytest.raises(InvalidSignature):
        verify_record(bad)


def test_one_key_has_one_id_string() -> None:
    me = NodeIdentity.generate()
    record = me.sign_record({"id": me.node_id, "n": 1})
    for variant in (me.node_id.upper(), " " + me.node_id, me.node_id[:2] + " " + me.node_id[2:]):
        body = {**record["body"], "id": variant}
        with pytest.raises(InvalidSignature):
            verify_record({"body": body, "sig": me.sign(canonical(body)).hex()})


def test_network_id_changes_with_any_parameter(tmp_path: Path) -> None:
    base = NetworkGenesis()
    assert base.network_id == NetworkGenesis().network_id
    assert NetworkGenesis(gossip=GossipParams(fanout=4)).network_id != base.network_id
    assert NetworkGenesis(name="other").network_id != base.network_id
    path = tmp_path / "network.yaml"
    write_genesis(base, path)
    assert load_genesis(path).network_id == base.network_id


def test_cli_keys_and_network(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "wwwserve_gateway"]
    shown = subprocess.run(
        [*run, "keys", "show", "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    node_id = shown.stdout.strip()
    assert NodeIdentity.load_or_create(tmp_path).node_id == node_id
    refused = subprocess.run(
        [*run, "keys", "new", "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "--force" in refused.stderr
    renewed = subprocess.run(
        [*run, "keys", "new", "--data-dir", str(tmp_path), "--force"], capture_output=True, text=True
    )
    assert renewed.stdout.strip() not in ("", node_id)
    assert (tmp_path / (KEY_FILE + ".old")).exists()
    out = tmp_path / "net.yaml"
    made = subprocess.run(
        [*run, "network", "init", "-o", str(out), "--interval", "0.5"], capture_output=True, text=True
    )
    assert made.stdout.strip() == load_genesis(out).network_id
    assert load_genesis(out).gossip.interval_s == 0.5
