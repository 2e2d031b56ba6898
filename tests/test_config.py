"""Policy-file validation: good files load, and each mistake names its key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wwwserve_gateway.config.loading import load_config, parse_config
from wwwserve_gateway.config.problems import ConfigError
from wwwserve_gateway.plugin_api.loading import check_plugins

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def problems(raw: dict) -> list[str]:
    """Every problem a node would refuse the config for: its own sections' and its plugins'."""
    with pytest.raises(ConfigError) as info:
        parse_config(raw, checks=(check_plugins,))
    return [str(p) for p in info.value.problems]


def test_minimal_config_has_defaults() -> None:
    config = parse_config({})
    assert config.node.port == 4000
    assert config.model_list == []


@pytest.mark.parametrize(
    "path",
    sorted([*EXAMPLES.glob("*.yaml"), *EXAMPLES.glob("local-network/node*.yaml")]),
    ids=lambda p: p.name,
)
def test_examples_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")
    monkeypatch.setenv("WWWSERVE_API_KEY", "sk-example")
    config = load_config(path)
    assert config.model_list
    assert config.node.data_dir.is_absolute()


def test_litellm_model_list_shape() -> None:
    config = parse_config(
        {
            "model_list": [
                {
                    "model_name": "gpt",
                    "litellm_params": {
                        "model": "openai/gpt-4o-mini",
                        "api_base": "http://127.0.0.1:1/v1",
                        "rpm": 60,
                        "tpm": 10000,
                    },
                    "model_info": {"id": "gpt-a", "mode": "chat", "base_model": "gpt-4o-mini"},
                }
            ]
        }
    )
    entry = config.model_list[0]
    assert entry.provider == "openai"
    assert entry.deployment_id == "gpt-a"


def test_env_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "secret-1")
    config = parse_config({"node": {"api_keys": ["os.environ/MY_KEY"]}})
    assert config.node.api_keys == ["secret-1"]


def test_missing_env_reference_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    raw = {
        "model_list": [
            {
                "model_name": "m",
                "litellm_params": {"model": "openai/x", "api_key": "os.environ/NOT_SET_ANYWHERE"},
            }
        ]
    }
    [message] = problems(raw)
    assert message.startswith("model_list[0].litellm_params.api_key:")
    assert "NOT_SET_ANYWHERE is not set" in message


def test_unknown_top_level_key_suggests_a_fix() -> None:
    [message] = problems({"nodes": {}})
    assert message.startswith("nodes: unknown key; did you mean 'node'?")
    assert "model_list" in message


def test_litellm_proxy_section_is_accepted_with_one_warning_per_key() -> None:
    config = parse_config({"litellm_settings": {"callbacks": [], "request_timeout": 30}})
    assert [str(w) for w in config.warnings] == [
        "litellm_settings.callbacks: no effect on a wwwserve node: LiteLLM callbacks are not run; "
        "use /metrics and the access log (node.access_log)"
    ]
    assert config.node.request_timeout == 30  # honoured


def test_unknown_node_key() -> None:
    [message] = problems({"node": {"prot": 5}})
    assert message.startswith("node.prot: unknown key; did you mean 'port'?")


def test_wrong_type_says_what_is_expected() -> None:
    [message] = problems({"node": {"port": "eighty"}})
    assert message.startswith("node.port:")
    assert "TCP port" in message and "'eighty'" in message


@pytest.mark.parametrize(
    ("params", "model"),
    [
        ({"model": "gpt-4o"}, "openai/gpt-4o"),  # LiteLLM infers OpenAI's names
        ({"model": "text-embedding-3-small"}, "openai/text-embedding-3-small"),
        ({"model": "my-model", "api_base": "http://h/v1"}, "openai/my-model"),
        ({"model": "claude-3-5-sonnet"}, "litellm/claude-3-5-sonnet"),  # LiteLLM's own inference
        ({"model": "llama3", "custom_llm_provider": "ollama_chat"}, "ollama_chat/llama3"),
        ({"model": "anthropic/claude-3-5-sonnet"}, "litellm/anthropic/claude-3-5-sonnet"),
        ({"model": "hosted_vllm/smol"}, "hosted_vllm/smol"),
    ],
)
def test_a_bare_model_name_gets_the_provider_litellm_infers(params: dict, model: str) -> None:
    config = parse_config({"model_list": [{"model_name": "m", "litellm_params": params}]})
    assert config.model_list[0].litellm_params["model"] == model


def test_env_references_of_unused_keys_are_not_resolved() -> None:
    raw = {
        "router_settings": {"redis_host": "os.environ/WWWSERVE_TEST_UNSET"},
        "general_settings": {"database_url": "os.environ/WWWSERVE_TEST_UNSET"},
        "node": {"admin_key": "os.environ/WWWSERVE_TEST_UNSET"},
    }
    [message] = problems(raw)  # only the key in use needs its variable
    assert message.startswith("node.admin_key: environment variable WWWSERVE_TEST_UNSET is not set")


def test_missing_model_name() -> None:
    [message] = problems({"model_list": [{"litellm_params": {"model": "openai/x"}}]})
    assert message.startswith("model_list[0].model_name: required key is missing")


def test_unknown_backend_param_is_checked_by_the_backend() -> None:
    raw = {
        "model_list": [
            {"model_name": "m", "litellm_params": {"model": "openai/x", "api_bsae": "http://h/v1"}}
        ]
    }
    [message] = problems(raw)
    assert message.startswith("model_list[0].litellm_params.api_bsae: unknown key; did you mean 'api_base'?")


def test_backend_param_type() -> None:
    raw = {"model_list": [{"model_name": "m", "litellm_params": {"model": "llamacpp/smollm2", "n_ctx": -1}}]}
    [message] = problems(raw)
    assert message.startswith("model_list[0].litellm_params.n_ctx:")
    assert "context length" in message


def test_duplicate_deployment_ids() -> None:
    entry = {"model_name": "m", "litellm_params": {"model": "openai/x"}}
    [message] = problems({"model_list": [entry, entry]})
    assert message.startswith("model_list[1].model_info.id:") and "used twice" in message


def test_all_problems_are_reported_at_once() -> None:
    assert len(problems({"node": {"prot": 1, "host": 5}})) == 2


def test_invalid_yaml_gives_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("node:\n  port: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML at line" in str(info.value)


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump({"node": {"data_dir": "state"}}))
    assert load_config(path).node.data_dir == tmp_path / "state"


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/x"}}]})
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"node": {"port": 99999}}))
    run = [sys.executable, "-m", "wwwserve_gateway", "check-config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    failed = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert "node.port:" in failed.stderr and "less than or equal to 65535" in failed.stderr


@pytest.mark.parametrize(
    ("section", "settings", "key"),
    [
        ("judge", {"plugin": "reference", "settings": {"otherwise": "maybe"}}, "judge.settings.otherwise"),
        ("judge", {"settings": {"max_tokens": "8"}}, "judge.settings.max_tokens"),
        ("judge", {"plugin": "no-such-judge"}, "judge.plugin"),
        ("router", {"settings": {"quality_span": 0.5}}, "router.settings.quality_span"),
        ("policy", {"settings": {"bond": -1}}, "policy.settings.bond"),
    ],
)
def test_each_plugin_slot_checks_its_settings(section: str, settings: dict, key: str) -> None:
    [message] = problems({section: settings})
    assert message.startswith(key)
