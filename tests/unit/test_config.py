import argparse
import dataclasses
import os
from pathlib import Path

import pytest

from gateway import config
from gateway.config import FIELDS, Settings, add_serve_arguments, default, env_var, flag, settings_from_args
from gateway.instance_kind import CHOICES
from gateway.policy import POLICIES


@pytest.fixture(autouse=True)
def _no_mme_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()  # built after the environment is set: it reads it
    add_serve_arguments(parser)
    return parser


def _settings(*argv: str) -> Settings:
    return settings_from_args(_parser().parse_args(list(argv)))


def _other_value(name: str, tmp_path: Path) -> str:
    """A valid value for setting `name` that is not its default, as the environment would give it."""
    f = FIELDS[name]
    choices = f.metadata["choices"]
    if choices:
        return next(choice for choice in choices if choice != f.default)
    kind = config._kind(name)
    if kind is bool:
        return "false" if f.default else "yes"
    if kind is int:
        return str((f.default or 0) + 3)
    if kind is float:
        return str((f.default or 0.0) + 0.25)
    if kind is Path:
        return str(tmp_path / "elsewhere")
    return f"{name}-value"


def test_every_setting_has_one_flag_and_one_environment_variable() -> None:
    actions = [action for action in _parser()._actions if action.option_strings != ["-h", "--help"]]
    assert sorted(a for action in actions for a in action.option_strings) == sorted(flag(name) for name in FIELDS)
    assert all(len(action.option_strings) == 1 for action in actions)
    assert len({env_var(name) for name in FIELDS}) == len(FIELDS)
    assert all(env_var(name) == "MME_" + flag(name)[2:].replace("-", "_").upper() for name in FIELDS)


def test_flags_keep_their_names() -> None:
    """Settings in seconds are named without their unit on the command line, as they always were."""
    assert [flag(n) for n in ("wait_timeout_s", "etag_ttl_s", "load_timeout_s", "queue_timeout_s",
                              "admission_wait_s", "min_residency_s", "remeasure_interval_s")] == [
        "--wait-timeout", "--etag-ttl", "--load-timeout", "--queue-timeout",
        "--admission-wait", "--min-residency", "--remeasure-interval"]
    assert (flag("max_artifact_bytes"), env_var("max_artifact_bytes")) == ("--max-artifact-bytes",
                                                                           "MME_MAX_ARTIFACT_BYTES")


def test_each_environment_variable_sets_its_setting_and_no_other(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    base = {"store": "s", "triton_http_url": "h:1", "triton_grpc_url": "g:2"}  # the two URLs go together
    for name, value in base.items():
        monkeypatch.setenv(env_var(name), value)
    before = dataclasses.asdict(_settings())
    for name in FIELDS:
        with monkeypatch.context() as env:
            value = _other_value(name, tmp_path)
            env.setenv(env_var(name), value)
            after = dataclasses.asdict(_settings())
        changed = {n for n in FIELDS if after[n] != before[n]}
        assert changed == {name}, name
        assert str(after[name]) == value or after[name] == config.parse(name, value), name


def test_defaults_come_out_as_declared() -> None:
    settings = _settings("--store", "s")
    for name, f in FIELDS.items():
        if name == "store":
            continue
        declared = f.default.resolve() if name == "cache_dir" else f.default
        assert getattr(settings, name) == declared, name
    assert settings.memory_budget_bytes is None and settings.max_concurrency is None
    assert settings.embedded_triton
    assert default("wait_timeout_s") == settings.wait_timeout_s == 60.0
    with pytest.raises(KeyError):
        default("store")


def test_the_environment_overrides_a_default_and_a_flag_overrides_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MME_STORE", "env-store")
    monkeypatch.setenv("MME_WAIT_TIMEOUT", "7.5")
    monkeypatch.setenv("MME_PORT", "9999")
    settings = _settings("--port", "1234")
    assert (settings.store, settings.wait_timeout_s, settings.port) == ("env-store", 7.5, 1234)
    assert _settings("--wait-timeout", "3", "--store", "flag-store").wait_timeout_s == 3.0


def test_values_are_converted_to_the_declared_types(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MME_MEMORY_BUDGET_BYTES", "1024")
    monkeypatch.setenv("MME_CACHE_DIR", str(tmp_path / "env-cache"))
    settings = _settings("--store", "s", "--max-concurrency", "4", "--size-factor", "1.5", "--load-timeout", "9")
    assert settings.memory_budget_bytes == 1024 and type(settings.memory_budget_bytes) is int
    assert settings.max_concurrency == 4 and type(settings.max_concurrency) is int
    assert settings.size_factor == 1.5 and settings.load_timeout_s == 9.0 and type(settings.load_timeout_s) is float
    assert settings.cache_dir == tmp_path / "env-cache" and isinstance(settings.cache_dir, Path)
    assert _settings("--store", "s", "--cache-dir", "rel").cache_dir == Path("rel").resolve()
    with pytest.raises(SystemExit):
        _settings("--store", "s", "--port", "eighty")
    monkeypatch.setenv("MME_SIZE_FACTOR", "big")
    with pytest.raises(SystemExit):
        _settings("--store", "s")


def test_choices_come_from_where_they_are_defined() -> None:
    actions = {action.dest: action for action in _parser()._actions}
    assert tuple(actions["eviction_policy"].choices) == POLICIES
    assert tuple(actions["instance_kind"].choices) == CHOICES
    assert set(actions["onnx_backend"].choices) == {"auto", "python", "onnxruntime"}


def test_a_bad_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        _settings("--store", "s", "--eviction-policy", "fifo")
    monkeypatch.setenv("MME_INSTANCE_KIND", "tpu")  # argparse does not check a default; the settings do
    with pytest.raises(SystemExit, match="--instance-kind"):
        _settings("--store", "s")


def test_the_store_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="--store"):
        _settings()
    monkeypatch.setenv("MME_STORE", "")
    with pytest.raises(SystemExit, match="MME_STORE"):
        _settings()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--triton-http-url", "h:1"], "go together"),
        (["--triton-grpc-url", "g:1"], "go together"),
        (["--max-concurrent-loads", "0"], "at least 1"),
    ],
)
def test_settings_that_cannot_work_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        _settings("--store", "s", *argv)


def test_an_external_triton_needs_both_urls() -> None:
    settings = _settings("--store", "s", "--triton-http-url", "h:1", "--triton-grpc-url", "g:2")
    assert not settings.embedded_triton



def test_the_budget_takes_its_settings_from_the_settings() -> None:
    from gateway.budget import BudgetConfig

    settings = _settings("--store", "s", "--size-factor", "3", "--admission-wait", "4", "--max-concurrent-loads", "5")
    budget = BudgetConfig.from_settings(settings, memory_budget_bytes=1 << 30, device_check=False)
    assert (budget.memory_budget_bytes, budget.size_factor, budget.admission_wait_s) == (1 << 30, 3.0, 4.0)
    assert (budget.max_concurrent_loads, budget.device_check) == (5, False)
    taken = [f.name for f in dataclasses.fields(BudgetConfig) if f.name in FIELDS and f.name != "memory_budget_bytes"]
    assert len(taken) == 7
    assert all(getattr(BudgetConfig(), name) == default(name) for name in taken)  # the declared defaults


def test_a_yes_no_setting_is_one_flag_with_or_without_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _settings("--store", "s").container_api is False
    assert _settings("--store", "s", "--container-api").container_api is True
    assert _settings("--store", "s", "--container-api=no").container_api is False
    monkeypatch.setenv("MME_CONTAINER_API", "on")
    assert _settings("--store", "s").container_api is True
    assert _settings("--store", "s", "--container-api", "false").container_api is False
    monkeypatch.setenv("MME_CONTAINER_API", "maybe")
    with pytest.raises(SystemExit):  # argparse parses a text default as it would the flag
        _settings("--store", "s")


def test_the_isolation_settings_keep_their_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """compose.yaml and the README name these: --triton-api-key-file / MME_TRITON_API_KEY_FILE, --model-code."""
    assert (flag("triton_api_key_file"), env_var("triton_api_key_file")) == ("--triton-api-key-file",
                                                                             "MME_TRITON_API_KEY_FILE")
    assert (flag("model_code"), env_var("model_code")) == ("--model-code", "MME_MODEL_CODE")
    assert _settings("--store", "s").model_code == "allow"
    assert _settings("--store", "s", "--model-code", "refuse").model_code == "refuse"
    with pytest.raises(SystemExit):
        _settings("--store", "s", "--model-code", "sometimes")
    monkeypatch.setenv("MME_TRITON_API_KEY_FILE", str(tmp_path / "key"))
    assert _settings("--store", "s").triton_api_key_file == tmp_path / "key"


def test_an_unusable_triton_key_file_stops_the_start_naming_the_setting(tmp_path: Path) -> None:
    from gateway.app import _triton_api_key

    assert _triton_api_key(_settings("--store", "s")) is None
    (tmp_path / "key").write_text("  from-the-file \n")
    assert _triton_api_key(_settings("--store", "s", "--triton-api-key-file", str(tmp_path / "key"))) == "from-the-file"
    for text in ("", "two words"):
        (tmp_path / "key").write_text(text)
        with pytest.raises(SystemExit, match="--triton-api-key-file"):
            _triton_api_key(_settings("--store", "s", "--triton-api-key-file", str(tmp_path / "key")))
    with pytest.raises(SystemExit, match="--triton-api-key-file"):
        _triton_api_key(_settings("--store", "s", "--triton-api-key-file", str(tmp_path / "missing")))
