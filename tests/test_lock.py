"""The locks in requirements/ agree with pyproject.toml, and every install uses them.

`make lock` writes ``requirements/test.lock`` (runtime + ``gpu`` + ``test`` extras) and
``requirements/serve.lock`` (runtime + ``gpu``) with uv, resolved once for Python 3.11 and
3.12 against the CPU build of torch pinned in ``requirements/torch-cpu.txt``. A dependency
added, dropped or re-bounded in pyproject.toml without `make lock` fails here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
# The environments the locks promise: CPython 3.11 and 3.12 on Linux x86_64 and aarch64.
ENVIRONMENTS = [
    {"python_version": py, "python_full_version": f"{py}.0", "sys_platform": "linux", "platform_system": "Linux",
     "platform_machine": machine, "implementation_name": "cpython", "platform_python_implementation": "CPython",
     "os_name": "posix"}
    for py in ("3.11", "3.12") for machine in ("x86_64", "aarch64")
]


@dataclass
class Pin:
    version: Version
    marker: Marker | None
    hashes: list[str]
    via: list[str] = field(default_factory=list)

    def applies(self, env: dict[str, str]) -> bool:
        return self.marker is None or self.marker.evaluate(env)


def read_lock(path: Path) -> dict[str, list[Pin]]:
    """name -> its pins (one per marker range) from a ``uv pip compile --generate-hashes`` file."""
    pins: dict[str, list[Pin]] = {}
    current: Pin | None = None
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line):
            current = Pin(Version(m[2]), Marker(m[3]) if m[3] else None, [])
            pins.setdefault(canonicalize_name(m[1]), []).append(current)
        elif current is not None and (h := re.match(r"^\s+--hash=(sha256:[0-9a-f]{64})", line)):
            current.hashes.append(h[1])
        elif current is not None and (v := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)) and v[1] != "via":
            current.via.append(v[1])
    return pins


def direct_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


LOCKS = {"test.lock": ("gpu", "test"), "serve.lock": ("gpu",)}


@pytest.mark.parametrize("lock_name", sorted(LOCKS))
def test_lock_pins_every_direct_dependency_within_its_bounds(lock_name: str) -> None:
    pins = read_lock(REQUIREMENTS / lock_name)
    torch_pin = Requirement((REQUIREMENTS / "torch-cpu.txt").read_text().strip())
    for req in direct_requirements(LOCKS[lock_name]):
        name = canonicalize_name(req.name)
        for env in ENVIRONMENTS:
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if name == "torch":  # installed from PyTorch's CPU index, outside the hash-checked lock
                (version,) = [Version(s.version) for s in torch_pin.specifier]
                assert req.specifier.contains(version), f"{torch_pin} is outside pyproject's {req}"
                continue
            chosen = [p for p in pins.get(name, []) if p.applies(env)]
            assert len(chosen) == 1, f"{lock_name} pins {req.name} {len(chosen)} times for {env}: run `make lock`"
            assert req.specifier.contains(chosen[0].version, prereleases=True), (
                f"{lock_name} pins {req.name}=={chosen[0].version}, outside pyproject's {req}: run `make lock`")


@pytest.mark.parametrize("lock_name", sorted(LOCKS))
def test_lock_holds_no_direct_dependency_that_pyproject_dropped(lock_name: str) -> None:
    direct = {canonicalize_name(r.name) for r in direct_requirements(LOCKS[lock_name])}
    for name, pins in read_lock(REQUIREMENTS / lock_name).items():
        for pin in pins:
            if "loomserve (pyproject.toml)" in pin.via:
                assert name in direct, f"{lock_name} still lists {name} as a direct dependency: run `make lock`"
            assert pin.via, f"{lock_name}: {name} is required by nothing"


def test_every_pin_is_hash_checked_and_torch_is_left_to_its_own_index() -> None:
    for lock_name in LOCKS:
        pins = read_lock(REQUIREMENTS / lock_name)
        assert "torch" not in pins
        for name, entries in pins.items():
            assert all(p.hashes for p in entries), f"{lock_name}: {name} has no hash"
    assert (REQUIREMENTS / "torch-cpu.txt").read_text().strip().endswith("+cpu")


def test_serve_lock_pins_the_same_versions_as_the_test_lock() -> None:
    test_pins = read_lock(REQUIREMENTS / "test.lock")
    for name, pins in read_lock(REQUIREMENTS / "serve.lock").items():
        assert [p.version for p in pins] == [p.version for p in test_pins[name]], name


def test_every_install_path_uses_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r requirements/test.lock" in makefile
    assert "TORCH ?= -r requirements/torch-cpu.txt" in makefile
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r requirements/serve.lock" in dockerfile
    assert "requirements/torch-cpu.txt" in dockerfile
