"""The module's first-use install: what is missing, and Slicer's numpy/SimpleITK protected."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "AnkleFracture") not in sys.path:
    sys.path.insert(0, str(ROOT / "AnkleFracture"))

from AnkleFractureSlicer import dependencies as D  # noqa: E402


def test_shipped_requirements_are_installed_here_and_exclude_protected_packages():
    requirements = D.readRequirements(ROOT / "Resources" / "requirements.txt")
    assert requirements and all(not r.startswith("#") for r in requirements)
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}
    assert not names & {"torch", "numpy", "simpleitk"}
    assert D.missingRequirements(requirements) == []  # this venv has them all
    assert D.torchAvailable()


def test_missing_and_mismatched_requirements_are_found():
    numpy_version = metadata.version("numpy")
    assert D.missingRequirements(["no-such-package-ankle>=1"]) == ["no-such-package-ankle>=1"]
    assert D.missingRequirements([f"numpy=={numpy_version}"]) == []
    assert D.missingRequirements(["numpy<1.0"]) == ["numpy<1.0"]
    # A marker that does not apply here is not "missing".
    assert D.missingRequirements(["no-such-package-ankle; python_version < '3.0'"]) == []


def test_constraints_pin_what_is_installed(tmp_path):
    text = D.constraintsText()
    assert f"numpy=={metadata.version('numpy')}" in text.splitlines()
    assert f"SimpleITK=={metadata.version('SimpleITK')}" in text.splitlines()
    assert D.constraintsText(["no-such-package-ankle"]) == ""
    constraints = tmp_path / "c.txt"
    assert D.pipArguments(["monai>=1.3"], constraints) == ["-c", str(constraints), "monai>=1.3"]
    assert D.pipArguments(["monai>=1.3"], None) == ["monai>=1.3"]


def test_constraints_pin_the_pytorch_extensions_torch_and_torchvision(monkeypatch):
    """monai requires torch: without a pin pip could replace the PyTorch extension's build."""
    assert {"torch", "torchvision"} <= set(D.PROTECTED)
    pins = D.constraintsText().splitlines()
    # The exact installed build, local version label included (e.g. 2.13.0+cpu, 2.5.1+cu121).
    assert f"torch=={metadata.version('torch')}" in pins
    installed = {"numpy": "1.26.4", "SimpleITK": "2.3.1", "torch": "2.5.1+cu121",
                 "torchvision": "0.20.1+cu121"}

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(D.metadata, "version", version)
    assert D.constraintsText().splitlines() == [
        "numpy==1.26.4", "SimpleITK==2.3.1", "torch==2.5.1+cu121", "torchvision==0.20.1+cu121"]
    del installed["torchvision"]  # not installed: nothing to pin, and no error
    assert D.constraintsText().splitlines() == [
        "numpy==1.26.4", "SimpleITK==2.3.1", "torch==2.5.1+cu121"]
    # Each pin is a valid pip constraint that admits only that build.
    from packaging.requirements import Requirement

    torch_pin = Requirement("torch==2.5.1+cu121")
    assert torch_pin.specifier.contains("2.5.1+cu121")
    assert not torch_pin.specifier.contains("2.6.0")
