"""``loomserve serve``: ``--gateway-workers`` refused below one, from the command line or the
environment; the worker's CUDA graphs sized for ``--max-num-seqs`` unless told otherwise.
``loomserve new-key``: a key printed once, its digest in the keys file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from loomserve.cli import _parser, main, serve_configs
from loomserve.gateway.auth import KeyStore, hash_key, load_keys_file


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--gateway-workers", "0"], None, "must be at least 1, got 0"),
    ([], "0", "must be at least 1, got 0"),
    ([], "two", "expected a whole number, got 'two'"),
])
def test_gateway_workers_below_one_are_refused(argv: list[str], env: str | None, message: str,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    if env is not None:
        monkeypatch.setenv("LOOMSERVE_GATEWAY_WORKERS", env)
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2
    assert f"argument --gateway-workers: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "graph_seqs"), [
    ([], None),
    (["--max-num-seqs", "512"], None),
    (["--max-num-seqs", "512", "--cuda-graph-max-seqs", "64"], 64),
    (["--cuda-graph-max-seqs", "320"], 320),
])
def test_serve_leaves_the_worker_graphs_to_the_scheduler_unless_told(argv: list[str], graph_seqs: int | None) -> None:
    ns = _parser().parse_args(["serve", *argv])
    scheduler, worker, gateway = serve_configs(ns, "/run/x")
    assert worker.cuda_graph_max_seqs == graph_seqs
    assert scheduler.max_num_seqs == (512 if "512" in argv else 256)
    assert worker.scheduler_address == scheduler.worker_address == "ipc:///run/x/worker.sock"
    assert gateway.scheduler_address == scheduler.gateway_address == "ipc:///run/x/gateway.sock"


def _new_key(keys_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loomserve", "new-key", "--keys-file", str(keys_file), *args],
                          capture_output=True, text=True, timeout=60)


def test_new_key_prints_a_key_whose_digest_alone_lands_in_the_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    first = _new_key(keys_file, "--tenant", "acme", "--name", "ci")
    second = _new_key(keys_file, "--tenant", "globex")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    key_a, key_b = first.stdout.strip(), second.stdout.strip()
    assert key_a.startswith("lsk-") and key_a != key_b and "\n" not in key_a
    text = keys_file.read_text()
    assert key_a not in text and key_b not in text
    records = load_keys_file(keys_file)
    assert [(r.tenant, r.name, r.sha256) for r in records] == [("acme", "ci", hash_key(key_a)),
                                                               ("globex", "", hash_key(key_b))]
    store = KeyStore(records)
    principal = asyncio.run(store.authenticate(key_b))
    assert principal is not None and principal.tenant == "globex"


@pytest.mark.parametrize(("content", "tenant", "needle"), [
    ('{"keys": [{"tenant": "a", "sha256": "not-a-digest"}]}', "acme", "64 lowercase hex digits"),
    ("[]", "acme", "must hold"),
    (None, "bad tenant!", "tenant 'bad tenant!' must be"),
])
def test_new_key_refuses_a_bad_keys_file_or_tenant_and_writes_nothing(tmp_path: Path, content: str | None,
                                                                       tenant: str, needle: str) -> None:
    keys_file = tmp_path / "keys.json"
    if content is not None:
        keys_file.write_text(content)
    run = _new_key(keys_file, "--tenant", tenant)
    assert run.returncode == 2 and run.stdout == ""
    assert needle in run.stderr
    assert (keys_file.read_text() if keys_file.exists() else None) == content
