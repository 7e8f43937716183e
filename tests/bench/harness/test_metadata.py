"""What a result file records about its run."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime

import pytest

from bench.harness.metadata import command_line, git_state, library_versions, run_metadata, utc_timestamp


def test_timestamp_is_utc_to_the_second() -> None:
    stamp = datetime.fromisoformat(utc_timestamp())
    assert stamp.tzinfo == UTC and stamp.microsecond == 0
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 5


def test_command_line_masks_secrets_and_quotes() -> None:
    command = command_line("bench.serving", ["--api-key", "sekrit", "--label", "two words", "--api-key=sekrit"])
    assert command == "python -m bench.serving --api-key '***' --label 'two words' '--api-key=***'"
    assert command_line("bench.x", ["--api-key"]) == "python -m bench.x --api-key"  # nothing to mask


def test_command_line_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/somewhere/bench/x.py", "--out", "r.json"])
    assert command_line("bench.x") == "python -m bench.x --out r.json"


def test_run_metadata_names_the_commit() -> None:
    commit, dirty = git_state()
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(dirty, bool)
    metadata = run_metadata("python -m bench.x")
    assert list(metadata) == ["date", "command", "git_commit", "git_dirty", "host", "platform", "python"]
    assert (metadata["command"], metadata["git_commit"]) == ("python -m bench.x", commit)


def test_library_versions() -> None:
    versions = library_versions(["numpy", "no-such-distribution-here"])
    assert versions["numpy"] is not None and versions["no-such-distribution-here"] is None
