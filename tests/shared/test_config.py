"""Options: every config field is a flag and an environment variable; secrets are masked."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass

import pytest

from loomserve.shared.config import (
    SchedulerConfig,
    WorkerConfig,
    _opt,
    add_arguments,
    config_argv,
    describe,
    from_namespace,
)


def test_environment_sets_defaults_and_the_command_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOMSERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("LOOMSERVE_ENABLE_PREFIX_CACHING", "false")
    parser = argparse.ArgumentParser()
    add_arguments(parser, SchedulerConfig)
    config = from_namespace(SchedulerConfig, parser.parse_args([]))
    assert config.max_num_seqs == 7 and config.enable_prefix_caching is False
    config = from_namespace(SchedulerConfig, parser.parse_args(["--max-num-seqs", "9"]))
    assert config.max_num_seqs == 9


def test_config_survives_the_trip_through_argv() -> None:
    config = WorkerConfig(model="/m.gguf", kv_cache_gb=0.5, num_threads=2, device="cpu")
    parser = argparse.ArgumentParser()
    add_arguments(parser, WorkerConfig)
    assert from_namespace(WorkerConfig, parser.parse_args(config_argv(config))) == config


def test_bad_values_are_refused() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, SchedulerConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--policy", "random"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--enable-prefix-caching", "maybe"])


def test_secrets_are_masked() -> None:
    @dataclass(frozen=True)
    class WithSecret:
        api_key: str = _opt("", "a key", secret=True)

    assert describe(WithSecret(api_key="sk-123")) == "api_key=****"


def test_every_command_has_help() -> None:
    for command in ("serve", "gateway", "scheduler", "worker", "fetch-model"):
        out = subprocess.run([sys.executable, "-m", "loomserve.cli", command, "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert "usage: loomserve" in out
    serve_help = subprocess.run([sys.executable, "-m", "loomserve.cli", "serve", "--help"], capture_output=True,
                                text=True, check=True).stdout
    assert "LOOMSERVE_MAX_NUM_BATCHED_TOKENS" in serve_help
