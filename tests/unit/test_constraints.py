"""constraints.txt (the versions `make` installs) pins every dependency pyproject.toml names,
each pin within pyproject's own bounds, and the Makefile's venv holds exactly those pins."""

import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def pins() -> dict[str, tuple[str, Requirement]]:
    """name -> (version, the line as a requirement) for each pin whose marker holds here."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
        if req.marker is None or req.marker.evaluate():
            out[norm(req.name)] = (next(iter(req.specifier)).version, req)
    return out


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wanted() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_pinned_within_its_bounds():
    have = pins()
    for req in wanted():
        assert norm(req.name) in have, f"constraints.txt lacks {req.name}: run `make lock`"
        version = have[norm(req.name)][0]
        assert req.specifier.contains(version, prereleases=True), \
            f"constraints.txt pins {req.name}=={version} outside pyproject's {req.specifier}"


@pytest.mark.skipif(not (Path(sys.prefix) / ".installed").exists(),
                    reason="checks the venv `make` installed")
def test_the_make_venv_holds_the_pins():
    wrong = []
    for name, (version, _) in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing")
            continue
        if installed != version:
            wrong.append(f"{name} {installed} != {version}")
    assert not wrong, wrong
