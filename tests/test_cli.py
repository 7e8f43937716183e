"""``loomserve serve``: ``--gateway-workers`` refused below one, from the command line or the
environment; the worker's CUDA graphs sized for ``--max-num-seqs`` unless told otherwise."""

from __future__ import annotations

import pytest

from loomserve.cli import _parser, main, serve_configs


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
    ([], 256),
    (["--max-num-seqs", "512"], 512),
    (["--max-num-seqs", "512", "--cuda-graph-max-seqs", "64"], 64),
    (["--cuda-graph-max-seqs", "320"], 320),
])
def test_serve_sizes_the_worker_graphs_for_max_num_seqs(argv: list[str], graph_seqs: int) -> None:
    ns = _parser().parse_args(["serve", *argv])
    scheduler, worker, gateway = serve_configs(ns, "/run/x")
    assert worker.cuda_graph_max_seqs == graph_seqs
    assert scheduler.max_num_seqs == (512 if "512" in argv else 256)
    assert worker.scheduler_address == scheduler.worker_address == "ipc:///run/x/worker.sock"
    assert gateway.scheduler_address == scheduler.gateway_address == "ipc:///run/x/gateway.sock"
