"""What a result file records about its run: when, the command, the source tree and the host."""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
# Options whose value must not reach a result file: result files get shared.
SECRET_OPTIONS = ("--api-key",)


def utc_timestamp() -> str:
    """Now, in UTC, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <module> <argv>`` shell-quoted, secret option values masked; ``argv`` None:
    this process's own arguments."""
    words = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(words):
        name, equals, _ = word.partition("=")
        if name not in SECRET_OPTIONS:
            continue
        if equals:
            words[i] = f"{name}=***"
        elif i + 1 < len(words):
            words[i + 1] = "***"
    return shlex.join(["python", "-m", module, *words])


def git_state() -> tuple[str | None, bool | None]:
    """The checkout's commit and whether it has uncommitted changes (None where unknown)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    sha = commit.stdout.strip() if commit.returncode == 0 else None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return sha, dirty


def run_metadata(command: str | None) -> dict[str, Any]:
    """Date, command, commit and host of a run: the ``metadata`` of the serving-side result files."""
    commit, dirty = git_state()
    return {
        "date": utc_timestamp(),
        "command": command,
        "git_commit": commit,
        "git_dirty": dirty,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def library_versions(names: Sequence[str]) -> dict[str, str | None]:
    """The installed version of each distribution, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
