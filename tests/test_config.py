"""InferenceConfig: datatrove's field names and defaults, and errors at construction."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import PYTHON, ROOT
from infermill.config import InferenceConfig, server_types
from infermill.errors import ConfigError
from infermill.jobfile import load_job
from infermill.servers import SERVER_CLASSES

DATATROVE_DEFAULTS = {
    "model_max_context": 8192,
    "use_chat": True,
    "endpoint_url": None,
    "api_key": None,
    "tp": 1,
    "dp": 1,
    "pp": 1,
    "default_generation_params": {},
    "rollouts_per_document": 1,
    "max_concurrent_generations": 500,
    "max_concurrent_documents": None,
    "model_kwargs": None,
    "server_log_folder": None,
    "server_start_timeout_sec": 60,
    "server_ready_max_attempts": 300,
    "server_ready_delay_sec": 5.0,
    "server_start_max_retries": 1,
    "metric_interval": 120,
}


def make(**overrides) -> InferenceConfig:
    return InferenceConfig(**{"server_type": "dummy", "model_name_or_path": "m", **overrides})


def test_defaults_match_datatrove_field_for_field():
    config = InferenceConfig(server_type="vllm", model_name_or_path="org/model")
    assert config.server_type == "vllm"
    assert config.model_name_or_path == "org/model"
    for field, default in DATATROVE_DEFAULTS.items():
        assert getattr(config, field) == default, field


def test_request_timeout_defaults_to_600_seconds_and_none_disables_it():
    assert make().request_timeout == 600
    assert make(request_timeout=None).request_timeout is None


def test_every_datatrove_server_type_is_accepted():
    assert set(server_types()) == set(SERVER_CLASSES) == {"sglang", "vllm", "dummy", "custom", "endpoint"}
    for server_type in ("sglang", "vllm", "dummy"):
        assert make(server_type=server_type).server_type == server_type
    assert make(server_type="endpoint", endpoint_url="http://h:1/v1").server_type == "endpoint"
    assert make(server_type="custom", model_kwargs={"server_command": ["srv"]}).server_type == "custom"


def test_required_fields_are_named_when_missing():
    with pytest.raises(ConfigError) as excinfo:
        InferenceConfig()
    message = str(excinfo.value)
    assert "server_type" in message and "model_name_or_path" in message


def test_unknown_server_type_fails_at_construction_naming_the_value_and_the_valid_ones():
    with pytest.raises(ConfigError) as excinfo:
        make(server_type="warp-drive")
    assert "server_type: 'warp-drive' is not one of custom, vllm, sglang, endpoint, dummy" in str(excinfo.value)


def test_master_port_is_accepted_as_datatrove_names_it_and_checked():
    assert make(master_port=9810).master_port == 9810  # (a multi-node worker's rendezvous: tests/test_multinode.py)
    with pytest.raises(ConfigError, match="master_port: Input should be less than or equal to 65535"):
        make(master_port=70000)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("max_concurrent_generations", 0, "greater than or equal to 1"),
        ("max_concurrent_generations", -5, "greater than or equal to 1"),
        ("max_concurrent_documents", 0, "greater than or equal to 1"),
        ("max_concurrent_documents", -1, "greater than or equal to 1"),
        ("rollouts_per_document", 0, "greater than or equal to 1"),
        ("rollouts_per_document", -2, "greater than or equal to 1"),
        ("request_timeout", 0, "greater than 0"),
        ("request_timeout", -1.5, "greater than 0"),
        ("server_ready_delay_sec", 0, "greater than 0"),
        ("server_ready_delay_sec", -0.1, "greater than 0"),
    ],
)
def test_out_of_range_value_fails_naming_the_field_the_allowed_range_and_the_value(field, value, allowed):
    with pytest.raises(ConfigError) as excinfo:
        make(**{field: value})
    assert f"{field}: Input should be {allowed}" in str(excinfo.value)
    assert f"(got {value!r})" in str(excinfo.value)


def test_assignment_is_validated_too():
    config = make()
    with pytest.raises(ConfigError, match=r"max_concurrent_generations: .* \(got 0\)"):
        config.max_concurrent_generations = 0


def test_endpoint_without_endpoint_url_fails_naming_endpoint_url():
    with pytest.raises(ConfigError) as excinfo:
        make(server_type="endpoint")
    assert "endpoint_url" in str(excinfo.value)


@pytest.mark.parametrize(
    ("server_type", "suggested"), [("openai", "endpoint"), ("OpenAI-compatible", "endpoint"), ("vlm", "vllm")]
)
def test_an_unknown_server_type_suggests_the_closest_one_or_the_one_an_alias_means(server_type, suggested):
    with pytest.raises(ConfigError) as excinfo:
        make(server_type=server_type)
    assert f"server_type: {server_type!r} is not one of" in str(excinfo.value)
    assert f"(did you mean {suggested!r}?)" in str(excinfo.value)


def test_an_unknown_value_far_from_every_known_one_suggests_nothing():
    with pytest.raises(ConfigError) as excinfo:
        make(server_type="warp-drive")
    assert "did you mean" not in str(excinfo.value)


def test_a_misspelt_job_file_key_suggests_the_key_of_its_own_section(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "input: {path: in.jsonl, text_kye: body}\noutput: {path: out}\nrollout: {template: 'x [[DOCUMENT]]'}\n"
        "inference: {server_type: dummy, model_name_or_path: m, max_concurent_generations: 4}\n"
        "checkpoints: {records_per_chunk: 10}\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_job(job)
    message = str(excinfo.value)
    assert "input.text_kye: unknown key (did you mean 'text_key'?)" in message, message
    assert "inference.max_concurent_generations: unknown key (did you mean 'max_concurrent_generations'?)" in message
    assert "checkpoints: unknown key (did you mean 'checkpoint'?)" in message, message


def test_unknown_field_name_fails_naming_the_field():
    with pytest.raises(ConfigError) as excinfo:
        make(max_concurrent_request=3)
    assert "max_concurrent_request: unknown key" in str(excinfo.value)


def test_api_key_never_shows_in_repr_str_or_json_but_is_usable():
    secret = "sk-very-secret-123"
    config = make(server_type="endpoint", endpoint_url="http://h:1", api_key=secret)
    assert secret not in repr(config)
    assert secret not in str(config)
    assert secret not in config.model_dump_json()
    assert secret not in repr(config.model_dump())
    assert config.api_key_value() == secret
    assert make().api_key_value() is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"server_type": "endpoint"},  # a config-wide error: endpoint without endpoint_url
        {"server_type": "custom"},  # a config-wide error: no launch key
        {"max_concurrent_generations": 0},  # a field error
        {"model_kwargs": {"server_env": ["HF_TOKEN=hf_token_456"]}},  # server_env itself is bad
        {"api_key": ["sk-very-secret-123"]},  # api_key itself is bad
        {"api_key": 1234567890123456},  # a number where a string goes: still not printed
        {"model_kwargs": [("server_env", {"HF_TOKEN": "hf_token_456"})]},  # model_kwargs not a mapping
        {"endpoint_url": ["http://user:sk-very-secret-123@host/v1"]},  # credentials in a URL
        {"server_type": "custom", "model_kwargs": {"server_command": "serve --token sk-very-secret-123"}},
    ],
)
def test_api_key_and_server_env_never_show_in_validation_errors(overrides):
    secret, token = "sk-very-secret-123", "hf_token_456"
    if overrides.get("api_key") == 1234567890123456:
        secret = "1234567890123456"
    with pytest.raises(ConfigError) as excinfo:
        make(**{"api_key": secret, "model_kwargs": {"server_env": {"HF_TOKEN": token}}, **overrides})
    assert secret not in str(excinfo.value)
    assert token not in str(excinfo.value)


@pytest.mark.parametrize(
    "url", ["http://user:sk-url-secret-1@h:1/v1", ["http://h:2/v1", "http://:sk-url-secret-1@h:1"]]
)
def test_api_key_with_credentials_in_endpoint_url_fails_naming_both_fields_not_their_values(url):
    with pytest.raises(ConfigError) as excinfo:
        make(server_type="endpoint", endpoint_url=url, api_key="sk-key-secret-2")
    message = str(excinfo.value)
    assert "api_key" in message and "endpoint_url" in message and "keep one" in message, message
    assert "sk-url-secret-1" not in message and "sk-key-secret-2" not in message
    assert make(server_type="endpoint", endpoint_url=url).api_key is None  # each alone is fine


@pytest.mark.parametrize(
    "generations, rollouts, expected",
    [(500, 1, 500), (10, 4, 2), (3, 8, 1), (1, 1, 1), (7, 7, 1)],
)
def test_concurrent_documents_defaults_to_generations_divided_by_rollouts_at_least_one(generations, rollouts, expected):
    config = make(max_concurrent_generations=generations, rollouts_per_document=rollouts)
    assert config.concurrent_documents == expected


def test_concurrent_documents_is_max_concurrent_documents_when_set():
    assert make(max_concurrent_documents=7, max_concurrent_generations=100).concurrent_documents == 7


def test_a_job_file_section_that_is_not_a_mapping_is_named_without_its_contents(tmp_path):
    from infermill.jobfile import load_job

    job = tmp_path / "job.yaml"
    job.write_text(
        "input: {path: x.jsonl}\noutput: {path: out}\nrollout: {template: '[[DOCUMENT]]'}\n"
        "inference:\n- server_type: endpoint\n  api_key: sk-very-secret-123\n"
    )
    with pytest.raises(ConfigError, match="inference: Input should be a valid dictionary") as excinfo:
        load_job(job)
    assert "sk-very-secret-123" not in str(excinfo.value)


def test_a_set_override_that_fails_names_the_key_not_the_value(tmp_path):
    from infermill.jobfile import apply_override

    with pytest.raises(ConfigError, match="--set inference.model_kwargs.server_env.HF_TOKEN: model_kwargs") as excinfo:
        apply_override({"inference": {"model_kwargs": None}}, "inference.model_kwargs.server_env.HF_TOKEN=hf_secret")
    assert "hf_secret" not in str(excinfo.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["inference.tp=2", "inference.api_key=sk-1", "runner.metadata_key=r", "inference.model_kwargs.x=1"],
        ["inference.endpoint_url=http://u:p@h/v1", "inference.server_type=endpoint"],
        ["inference.tp=2", "inference={server_type: dummy, model_name_or_path: n, api_key: sk-2}", "inference.dp=3"],
        ["output.storage_options.secret=sk-3", "output.path=o2", "input.storage_options={key: k, secret: sk-4}"],
        ["output={path: o3, storage_options: {secret: sk-5}}", "output.format=parquet", "input.limit=3"],
    ],
)
def test_secret_overrides_applied_after_the_others_give_the_job_of_the_order_given(tmp_path, overrides):
    """A worker applies the --set overrides of secret fields (from its environment) after those
    of its command line: the job is the same."""
    from infermill.jobfile import load_job, split_secret_overrides

    job = tmp_path / "job.yaml"
    job.write_text(
        "input: {path: x.jsonl}\noutput: {path: out}\nrollout: {template: '[[DOCUMENT]]'}\n"
        "inference: {server_type: vllm, model_name_or_path: m}\n"
    )
    public, secret = split_secret_overrides(overrides)
    assert not [o for o in public if "sk-" in o or "u:p@" in o or "model_kwargs" in o], public
    assert [o for o in overrides if "sk-" in o or "u:p@" in o] == [o for o in secret if "sk-" in o or "u:p@" in o]
    assert load_job(job, [*public, *secret]) == load_job(job, overrides)


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto "])
def test_max_concurrent_generations_auto_bounds_the_documents_by_its_limit(value):
    config = make(max_concurrent_generations=value, rollouts_per_document=2)
    assert config.max_concurrent_generations == "auto" and config.adaptive_concurrency
    assert config.concurrent_generations == 1024  # max_concurrent_generations_limit's default
    assert config.concurrent_documents == 512
    assert make(max_concurrent_generations="auto", max_concurrent_generations_limit=64).concurrent_generations == 64


@pytest.mark.parametrize(
    "value, message",
    [("many", "a valid integer >= 1, or 'auto' (got 'many')"), (0, "greater than or equal to 1, or 'auto' (got 0)")],
)
def test_max_concurrent_generations_other_than_a_number_or_auto_is_refused(value, message):
    with pytest.raises(ConfigError, match=re.escape(f"max_concurrent_generations: Input should be {message}")):
        make(max_concurrent_generations=value)


def test_a_fixed_max_concurrent_generations_stays_a_number():
    config = make(max_concurrent_generations="64")
    assert config.max_concurrent_generations == 64 and not config.adaptive_concurrency


def test_the_readmes_job_file_keys_are_every_key_as_the_models_say_with_a_meaning_each():
    """The README's table is `infermill keys --markdown`: regenerate it when a key changes."""
    from infermill.jobfile import JobConfig
    from infermill.keys import _model, job_keys, markdown

    keys = job_keys()
    assert [k.path for k in keys if not k.meaning] == [], "a job-file key without a description"
    paths = {k.path for k in keys}
    for section, field in JobConfig.model_fields.items():
        model = _model(field.annotation)  # (an optional section: its model)
        assert model is not None and all(f"{section}.{name}" in paths for name in model.model_fields), section
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- keys: generated by `infermill keys --markdown` -->\n")[1].split("<!-- keys: end -->")[0]
    assert table == markdown(keys), "README.md's 'Job file keys' is stale: paste `infermill keys --markdown` into it"


def test_infermill_keys_lists_a_sections_keys_and_names_the_sections_for_a_prefix_that_matches_none():
    listed = subprocess.run([PYTHON, "-m", "infermill", "keys", "checkpoint"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "checkpoint.records_per_chunk" in listed.stdout and "6000" in listed.stdout
    assert "input.path" not in listed.stdout
    refused = subprocess.run([PYTHON, "-m", "infermill", "keys", "inferance"], capture_output=True, text=True)
    assert refused.returncode == 2
    assert (
        "no job-file key starts with 'inferance': the sections are input, output, rollout, inference" in refused.stderr
    )
