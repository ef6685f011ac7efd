"""Packaging: the torch the Makefile installs is the floor pyproject.toml declares, and the wheel
ships its data files (tools/wheel_smoke.py installs the real wheel: `make wheel-smoke`)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from dropcluster.experiments.presets import preset_names

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _makefile_torch() -> Version:
    found = re.findall(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert len(found) == 1, found
    return Version(found[0])


def _torch_requirement() -> Requirement:
    found = [Requirement(item) for item in PYPROJECT["project"]["dependencies"]]
    torch_requirements = [requirement for requirement in found if requirement.name == "torch"]
    assert len(torch_requirements) == 1, found
    return torch_requirements[0]


def _wheel_smoke():
    spec = importlib.util.spec_from_file_location("wheel_smoke", ROOT / "tools" / "wheel_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_makefiles_torch_is_the_floor_of_the_torch_requirement():
    tested = _makefile_torch()
    (clause,) = _torch_requirement().specifier  # one clause: a floor, no cap
    assert clause.operator == ">="
    assert Version(clause.version) == Version(f"{tested.major}.{tested.minor}")
    assert tested in _torch_requirement().specifier


def test_the_installed_torch_meets_the_floor():
    installed = Version(torch.__version__)  # e.g. 2.13.0+cpu
    assert _torch_requirement().specifier.contains(installed, prereleases=True), installed


def test_the_wheel_smoke_installs_the_makefiles_torch():
    assert Version(_wheel_smoke().TORCH_VERSION) == _makefile_torch()


@pytest.mark.parametrize("distribution", ["lightning", "pytorch-lightning", "torchmetrics"])
def test_the_lightning_extra_accepts_the_tested_torch(distribution):
    requirements = [Requirement(text) for text in importlib.metadata.requires(distribution)]
    torch_requirements = [r for r in requirements if r.name == "torch" and r.marker is None]
    assert torch_requirements, requirements
    assert all(_makefile_torch() in r.specifier for r in torch_requirements), torch_requirements


def test_package_data_lists_py_typed_and_every_preset():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert data["dropcluster"] == ["py.typed"]
    assert data["dropcluster.experiments"] == ["presets/*.json"]
    package = ROOT / "src" / "dropcluster"
    assert (package / "py.typed").is_file()
    shipped = {path.stem for path in (package / "experiments").glob("presets/*.json")}
    assert shipped == set(preset_names())


def test_the_test_extra_has_the_build_frontend_of_make_dist():
    test_extra = PYPROJECT["project"]["optional-dependencies"]["test"]
    assert "build" in {Requirement(item).name for item in test_extra}
    assert "$(PY) -m build --quiet --outdir dist ." in (ROOT / "Makefile").read_text()


def _archives(tmp_path: Path, wheel_names: list[str]) -> tuple[Path, Path]:
    smoke = _wheel_smoke()
    wheel, sdist = (
        tmp_path / "dropcluster-9.9-py3-none-any.whl",
        tmp_path / "dropcluster-9.9.tar.gz",
    )
    metadata = (
        "Name: dropcluster\nVersion: 9.9\nRequires-Dist: torch>=2.13\nProvides-Extra: plot\n"
        'Requires-Dist: matplotlib>=3.6; extra == "plot"\nProvides-Extra: lightning\n'
        'Requires-Dist: Lightning_Utilities>=2.1; extra == "lightning"\n'
    )
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("dropcluster-9.9.dist-info/METADATA", metadata)
        for name in wheel_names:
            archive.writestr(name, "{}")
    with tarfile.open(sdist, "w:gz") as archive:
        for name in ["dropcluster/py.typed"] + [
            f"dropcluster/experiments/presets/{preset}" for preset in smoke.PRESETS
        ]:
            info = tarfile.TarInfo(f"dropcluster-9.9/src/{name}")
            info.size = 2
            archive.addfile(info, io.BytesIO(b"{}"))
    return wheel, sdist


def test_the_smoke_reads_the_wheels_version_and_extras_and_wants_py_typed_and_presets(tmp_path):
    smoke = _wheel_smoke()
    presets = [f"dropcluster/experiments/presets/{preset}" for preset in smoke.PRESETS]
    version, extras = smoke.check_archives(*_archives(tmp_path, ["dropcluster/py.typed", *presets]))
    assert (version, extras) == (
        "9.9",
        {"plot": {"matplotlib"}, "lightning": {"lightning-utilities"}},
    )
    with pytest.raises(smoke.SmokeError, match=r"the wheel lacks \['dropcluster/py.typed'\]"):
        smoke.check_archives(*_archives(tmp_path, presets))
