"""requirements.lock is the tested dependency set: every package pinned with hashes,
inside pyproject.toml's ranges, and — in the virtualenv the README's commands build
from it — exactly what is installed."""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, str]:
    """name -> version of every `name==version` line of the lock."""
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", LOCK.read_text(), flags=re.M)
    return {canonicalize_name(name): v for name, v in pins}


def test_every_line_is_pinned_with_hashes() -> None:
    text = LOCK.read_text()
    requirements = [line for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert len(requirements) == len(locked()) > 50
    # Each requirement is followed by at least one --hash before the next one starts.
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    for block in blocks:
        if re.match(r"^[A-Za-z0-9]", block):
            assert "--hash=sha256:" in block, f"no hash for {block.splitlines()[0]}"


def test_cpu_torch_and_the_tools_are_locked() -> None:
    pins = locked()
    assert pins["torch"] == "2.13.0+cpu"  # the CPU build, never the multi-GB CUDA one
    for tool in ("pip", "setuptools", "wheel", "ruff", "mypy", "pytest"):
        assert tool in pins, f"{tool} is not locked"


def test_the_lock_is_inside_pyproject_ranges() -> None:
    """A range changed in pyproject.toml without `scripts/lock` fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = locked()
    for line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not locked: run scripts/lock"
        pinned = Version(pins[name])
        assert req.specifier.contains(pinned, prereleases=True), (
            f"{req.name}=={pinned} in requirements.lock is outside pyproject's {req.specifier}: "
            "run scripts/lock"
        )


MARKER = Path(sys.prefix) / ".fedtune-installed"


@pytest.mark.skipif(
    not MARKER.is_file(), reason="not the virtualenv that scripts/bootstrap.sh built from the lock"
)
def test_installed_versions_are_exactly_the_locked_ones() -> None:
    """Every locked package at its version, the environment built from the files as
    they are now (the bootstrap's marker), and nothing else installed but fedtune and
    catalog models (`fedtune models install`)."""
    from importlib.metadata import distributions

    from fedtune.catalog import CATALOG

    files = [LOCK, ROOT / "pyproject.toml", ROOT / "scripts" / "bootstrap.sh"]
    want = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    assert MARKER.read_text().strip() == want, "the environment is stale: run scripts/test"
    pins = locked()
    wrong = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            wrong[name] = f"locked {pinned}, installed {installed}"
    assert not wrong, wrong
    allowed = set(pins) | {"fedtune"}
    allowed |= {canonicalize_name(p.name) for e in CATALOG.values() for p in e.packages}
    extra = sorted({canonicalize_name(d.metadata["Name"]) for d in distributions()} - allowed)
    assert not extra, f"installed but not locked: {extra}"
