"""A LiteLLM proxy config.yaml, written the way LiteLLM's documentation writes them, starts a node
unchanged: keys with a meaning are honoured, the others are accepted with one warning each, and
environment references are resolved only for keys in use. Real node process, real llama.cpp and stub
servers, the official openai SDK as the app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.support import LOOPBACK, ListeningChild, LlamaServer, NodeProcess, free_port

# The kind of file a LiteLLM proxy user has today (cf. docs.litellm.ai/docs/proxy/configs,
# /proxy/config_settings, /proxy/load_balancing, /proxy/reliability). {STUB}, {LLAMA} and {DEAD}
# are filled in with loopback servers.
LITELLM_CONFIG = """
model_list:
  # Three deployments of one model group, load balanced
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: {DEAD}
      api_key: os.environ/PRIMARY_API_KEY
      organization: os.environ/OPENAI_ORG_ID
      rpm: 600
      timeout: 30
      stream_timeout: 10
      max_retries: 1
      weight: 1
    model_info:
      id: gpt-4o-primary
  - model_name: gpt-4o
    litellm_params:
      model: gpt-4o               # bare name: LiteLLM infers openai/
      api_base: {STUB}
      api_key: os.environ/SECONDARY_API_KEY
      tpm: 100000
      weight: 2
    model_info:
      id: gpt-4o-secondary
  - model_name: gpt-4o
    litellm_params:
      model: hosted_vllm/tiny-ext
      api_base: {LLAMA}
      temperature: 0.2
    model_info:
      id: gpt-4o-local
  - model_name: llama-local
    litellm_params:
      model: hosted_vllm/tiny-ext
      api_base: {LLAMA}
      keep_alive: 5m
  # Anything under openai/ goes to the OpenAI-compatible server
  - model_name: "openai/*"
    litellm_params:
      model: "openai/*"
      api_base: {LLAMA}
      api_key: os.environ/SECONDARY_API_KEY

litellm_settings:
  drop_params: true
  set_verbose: false
  request_timeout: 120
  num_retries: 2
  success_callback: ["langfuse"]
  failure_callback: ["sentry"]
  cache: true
  cache_params:
    type: redis
    host: os.environ/REDIS_HOST
  json_logs: true
  context_window_fallbacks:
    - gpt-4o: ["llama-local"]

router_settings:
  routing_strategy: simple-shuffle
  num_retries: 3
  timeout: 60
  allowed_fails: 1
  cooldown_time: 30
  retry_after: 0
  fallbacks:
    - gpt-4o: ["llama-local"]
  model_group_alias:
    gpt-4: gpt-4o
  redis_host: os.environ/REDIS_HOST
  redis_port: os.environ/REDIS_PORT
  redis_password: os.environ/REDIS_PASSWORD
  enable_pre_call_checks: true

general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  database_url: os.environ/DATABASE_URL
  store_model_in_db: true
  proxy_batch_write_at: 60
  alerting: ["slack"]

environment_variables:
  PRIMARY_API_KEY: sk-primary-from-config
  OPENAI_ORG_ID: org-example
"""

WARNED = {
    "model_list[2].litellm_params.temperature",
    "model_list[3].litellm_params.keep_alive",
    "litellm_settings.drop_params",
    "litellm_settings.set_verbose",
    "litellm_settings.success_callback",
    "litellm_settings.failure_callback",
    "litellm_settings.cache",
    "litellm_settings.cache_params",
    "router_settings.redis_host",
    "router_settings.redis_port",
    "router_settings.redis_password",
    "router_settings.enable_pre_call_checks",
    "general_settings.database_url",
    "general_settings.store_model_in_db",
    "general_settings.proxy_batch_write_at",
    "general_settings.alerting",
}
MASTER_KEY = "sk-master-for-tests-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def stub() -> Iterator[ListeningChild]:
    child = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
    yield child
    child.stop()


def litellm_config(stub: ListeningChild, llama: LlamaServer) -> dict[str, Any]:
    text = LITELLM_CONFIG.format(
        DEAD=f"http://{LOOPBACK}:{free_port()}/v1",
        STUB=stub.url + "/v1",
        LLAMA=llama.base_url,
    )
    assert len(text.strip().splitlines()) >= 80
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, stub: ListeningChild, llama_tiny: LlamaServer
) -> Iterator[NodeProcess]:
    # Only the keys in use need their variables: REDIS_* and DATABASE_URL stay unset.
    for name in ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "DATABASE_URL"):
        assert name not in os.environ
    env = {"LITELLM_MASTER_KEY": MASTER_KEY, "SECONDARY_API_KEY": "sk-secondary"}
    os.environ.update(env)
    try:
        proc = NodeProcess(litellm_config(stub, llama_tiny), tmp_path_factory.mktemp("litellm-config"))
        proc.start()
    finally:
        for name in env:
            del os.environ[name]
    yield proc
    proc.stop()


def events(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def test_unused_keys_are_each_warned_once_and_nothing_else(node: NodeProcess) -> None:
    warned = [e["key"] for e in events(node, "config key has no effect")]  # json_logs: true honoured
    assert sorted(warned) == sorted(WARNED)
    assert all(e["reason"] for e in events(node, "config key has no effect"))


def test_the_master_key_opens_the_api_and_the_groups_route(node: NodeProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=node.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    app = openai.OpenAI(base_url=node.url + "/v1", api_key=MASTER_KEY, max_retries=0)
    names = {m.id for m in app.models.list()}
    assert {"gpt-4o", "gpt-4", "llama-local", "openai/*"} <= names
    # gpt-4o: three deployments, the first dead; simple-shuffle by weight, failover, no failed request.
    for _ in range(8):
        assert app.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2).choices
    # An alias, a wildcard group (the upstream name is what "*" matched), a bare Ollama-style group.
    assert app.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2).choices
    wild = app.chat.completions.with_raw_response.create(
        model="openai/tiny-ext", messages=MESSAGES, max_tokens=2
    )
    assert wild.parse().choices and wild.headers["x-wwwserve-route"]
    assert app.chat.completions.create(model="llama-local", messages=MESSAGES, max_tokens=2).choices
    with pytest.raises(openai.NotFoundError):
        app.chat.completions.create(model="claude-3", messages=MESSAGES)
    # The admin API takes the master key.
    backends = node_admin(node, MASTER_KEY)
    assert {b["id"] for b in backends} >= {"gpt-4o-primary", "gpt-4o-secondary", "gpt-4o-local"}


def node_admin(node: NodeProcess, key: str) -> list[dict[str, Any]]:
    import httpx

    resp = httpx.get(node.url + "/wwwserve/admin/backends", headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp.json()["backends"] if isinstance(resp.json(), dict) else resp.json()


def test_check_config_accepts_it_with_the_same_warnings(
    tmp_path: Path, stub: ListeningChild, llama_tiny: LlamaServer
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(litellm_config(stub, llama_tiny)))
    env = {**os.environ, "LITELLM_MASTER_KEY": MASTER_KEY, "SECONDARY_API_KEY": "x"}
    out = subprocess.run(
        [sys.executable, "-m", "wwwserve_gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "300"},
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    warned = [line.split()[1].rstrip(":") for line in out.stderr.splitlines() if line.startswith("warning ")]
    assert sorted(warned) == sorted(WARNED)
    # A variable a used key needs is still required, and named.
    del env["SECONDARY_API_KEY"]
    out = subprocess.run(
        [sys.executable, "-m", "wwwserve_gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2 and "SECONDARY_API_KEY" in out.stderr + out.stdout
