"""The declared dependency ranges, the two lock files and the running environment agree.

pyproject.toml gives each library that has broken hfcap within a minor version a closed range; requirements/lock.txt
(what `make train` / `make test` install) pins releases inside it; requirements/floor.in pins the lower bounds, which
`make test-floor` tests.
"""

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import Specifier
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RANGED = ("torch", "torchvision", "transformers", "tokenizers", "huggingface-hub", "accelerate", "datasets", "timm")
"""Libraries whose releases changed hfcap's behaviour within a minor version: both bounds required."""
FLOOR_EXCEPTIONS = ("torch", "torchvision")
"""Only torch 2.14.1 installs offline on the CPU machines; torch's floor is tested on the GPU machine."""


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {canonicalize_name(Requirement(line).name): Requirement(line) for line in project["dependencies"]}


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{path.name}: {line!r} is not a pin"
            pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def _bounds(requirement: Requirement) -> tuple[Specifier, Specifier]:
    lower = [s for s in requirement.specifier if s.operator == ">="]
    upper = [s for s in requirement.specifier if s.operator in ("<", "<=")]
    assert len(lower) == 1 and len(upper) == 1, f"{requirement} needs one lower and one upper bound"
    return lower[0], upper[0]


REQUIREMENTS = _requirements()


@pytest.mark.parametrize("name", RANGED)
def test_ranged_libraries_have_a_floor_and_a_ceiling(name):
    lower, upper = _bounds(REQUIREMENTS[name])
    assert Version(lower.version) < Version(upper.version)


@pytest.mark.parametrize("lock", ["lock.txt", "floor.txt"])
def test_locks_pin_every_dependency_within_its_range(lock):
    pins = _pins(ROOT / "requirements" / lock)
    for name, requirement in REQUIREMENTS.items():
        assert name in pins, f"{lock} does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} ∉ {requirement}"


def test_floor_pins_are_the_lower_bounds():
    floor, locked = _pins(ROOT / "requirements" / "floor.in"), _pins(ROOT / "requirements" / "floor.txt")
    for name in RANGED:
        lower, _ = _bounds(REQUIREMENTS[name])
        if name in FLOOR_EXCEPTIONS:
            assert Version(lower.version) <= floor[name]
        else:
            assert floor[name] == Version(lower.version), f"floor.in pins {name}=={floor[name]}, pyproject says {lower}"
        assert locked[name] == floor[name], f"floor.txt pins {name}=={locked[name]}, floor.in {floor[name]}"


def test_the_running_environment_is_inside_the_declared_ranges():
    for name in RANGED:
        installed = Version(version(name))
        assert REQUIREMENTS[name].specifier.contains(installed, prereleases=True), f"{name} {installed}"
