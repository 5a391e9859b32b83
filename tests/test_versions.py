"""One source of versions: the constraints file CI installs with is what this environment has and what the rendered
Modal images pin, so a green test run means the images' libraries were tested."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO
from volembed_runner.backends.modal import render
from volembed_runner.cli import _load

CONSTRAINTS = REPO / "volembed_runner" / "constraints.txt"
README_TEST_COMMAND = 'pip install -e ".[local,test]" -c volembed_runner/constraints.txt && python -m pytest'


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalized(name)] = version
    return pins


def test_installed_versions_are_the_constraints() -> None:
    wrong = {}
    for name, version in constraints().items():
        installed = Version(metadata.version(name))
        if installed.public != Version(version).public:  # torch's `+cpu` build is torch 2.13.0
            wrong[name] = f"installed {installed}, constraints {version}"
    assert not wrong, f"reinstall with -c {CONSTRAINTS.name}: {wrong}"


def test_rendered_images_pin_the_constraints() -> None:
    source = render.render_app(_load(REPO / "pipelines" / "wikipedia.yaml", None, backend="modal"))
    pinned = {normalized(n): v for n, v in re.findall(r"'([A-Za-z0-9_.-]+)==([^']+)'", source)}
    assert {"pydantic", "pypdf", "pyyaml", "tokenizers", "pyarrow", "numpy"} <= set(pinned)
    pins = constraints()
    assert {name: pins.get(name) for name in pinned} == pinned


def test_pyproject_ranges_admit_the_constraints() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                                for r in extra)]
    pins = constraints()
    for text in requirements:
        req = Requirement(text)
        name = normalized(req.name)
        assert name in pins, f"{req.name} has no exact version in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{text} excludes {name}=={pins[name]}"


def test_ci_and_the_readme_install_with_the_constraints() -> None:
    assert '-c volembed_runner/constraints.txt' in (REPO / ".ci" / "run").read_text()
    assert README_TEST_COMMAND in (REPO / "README.md").read_text()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "constraints.txt" in package_data["volembed_runner"]
