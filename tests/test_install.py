"""loomserve's wheel installs beside the packages its generic part names would once have
shadowed: Hugging Face's ``kernels`` (which transformers imports) and the newest transformers.

The wheel goes into a fresh virtual environment outside the checkout, with the CPU build of
torch and whatever pip resolves today for everything else (as a user installing loomserve
into their own environment gets), and serves a chat request from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from tests.stack import ServeStack

ROOT = Path(__file__).resolve().parent.parent
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _pip(venv: Path, *args: str, cwd: Path) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args], cwd=cwd, check=True,
                   timeout=900)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(work / "dist"), str(ROOT)], cwd=work, check=True, timeout=300)
    (wheel,) = (work / "dist").glob("loomserve-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    torch_cpu = ["-r", str(ROOT / "requirements" / "torch-cpu.txt")]
    try:  # as `make` does: PyPI and local wheels first, then PyTorch's CPU index
        _pip(venv, "--no-deps", *torch_cpu, cwd=work)
    except subprocess.CalledProcessError:
        _pip(venv, "--no-deps", "--extra-index-url", TORCH_INDEX, *torch_cpu, cwd=work)
    _pip(venv, str(wheel), cwd=work)
    _pip(venv, "--upgrade", "transformers", "kernels", cwd=work)
    return venv


def _venv_python(venv: Path, code: str, cwd: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=cwd, capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_wheel_installs_one_import_name(fresh_venv: Path, tmp_path: Path) -> None:
    (record,) = fresh_venv.glob("lib/python*/site-packages/loomserve-*.dist-info/RECORD")
    # Paths outside site-packages (../../../bin/loomserve, the console script) are no imports.
    top_level = {line.split("/", 1)[0] for line in record.read_text().splitlines() if not line.startswith("..")}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"loomserve"}


def test_hugging_face_kernels_and_newest_transformers_import_beside_loomserve(fresh_venv: Path,
                                                                              tmp_path: Path) -> None:
    found = json.loads(_venv_python(fresh_venv, (
        "import json, kernels, transformers, transformers.activations, loomserve.kernels, loomserve.gateway.app\n"
        "print(json.dumps({'kernels': kernels.__file__, 'hf_api': hasattr(kernels, 'get_kernel'),\n"
        "                  'transformers': transformers.__version__}))"), cwd=tmp_path))
    site = str(fresh_venv)
    assert found["kernels"].startswith(site) and "loomserve" not in found["kernels"]
    assert found["hf_api"], "`import kernels` is not Hugging Face's kernels package"
    newest = _venv_python(fresh_venv, "import importlib.metadata as m; print(m.version('transformers'))", tmp_path)
    assert found["transformers"] == newest.strip()


def test_installed_loomserve_serve_answers_a_chat_request(fresh_venv: Path, tmp_path: Path,
                                                          default_model_path: Path) -> None:
    env = {"PATH": f"{fresh_venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    stack = ServeStack("--kv-cache-gb", "0.25", command=[str(fresh_venv / "bin" / "loomserve")], env=env,
                       cwd=tmp_path, log_path=tmp_path / "serve.log")
    try:
        stack.wait_ready()
        client = OpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in (reply.choices[0].message.content or "")
    finally:
        assert stack.stop() == 0, stack.log_tail()
