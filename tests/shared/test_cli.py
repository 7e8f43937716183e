"""``loomserve serve --gateway-workers``: refused below one, from the command line or the environment."""

from __future__ import annotations

import pytest

from shared.cli import main


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
