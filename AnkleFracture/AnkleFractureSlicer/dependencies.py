"""The Python packages the module needs inside Slicer, and how to install them safely.

``Resources/requirements.txt`` lists what pip installs on first use (the module asks first).
Three packages are never installed by pip here:

* torch comes from the PyTorch extension (``EXTENSION_DEPENDS``), which picks the build that
  matches the computer's GPU;
* numpy and SimpleITK are Slicer's own: replacing them can break the application.

pip is given a constraints file pinning the installed version of each of :data:`PROTECTED`:
Slicer's numpy and SimpleITK, and the PyTorch extension's torch and torchvision (monai
requires torch, and pip would otherwise be free to replace that GPU build with another).

The functions here only read package metadata and build command arguments; the module's
widget runs them with ``slicer.packaging.pip_ensure`` (Slicer >= 5.11) or
``slicer.util.pip_install``.

Example:
    >>> missingRequirements(["numpy>=1.0"]) == []
    True
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import List, Optional, Sequence

#: Packages Slicer ships (numpy, SimpleITK) or the PyTorch extension installed (torch,
#: torchvision) that pip must never replace; each is pinned only when it is installed.
PROTECTED = ("numpy", "SimpleITK", "torch", "torchvision")
TORCH = "torch"


def readRequirements(path: Path) -> List[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _unsatisfied(requirement: str) -> bool:
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return False
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return True
    return bool(req.specifier) and not req.specifier.contains(installed, prereleases=True)


def missingRequirements(requirements: Sequence[str]) -> List[str]:
    """The requirements that are not installed, or installed in a version that does not fit."""
    return [r for r in requirements if _unsatisfied(r)]


def torchAvailable() -> bool:
    """True when torch is installed (its import is left to the first model load)."""
    try:
        metadata.version(TORCH)
    except metadata.PackageNotFoundError:
        return False
    return True


def constraintsText(protected: Sequence[str] = PROTECTED) -> str:
    """pip constraints pinning the installed version of each protected package.

    Example:
        >>> "numpy==" in constraintsText(["numpy"])
        True
    """
    pins = []
    for name in protected:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue  # not installed: nothing to protect
    return "\n".join(pins) + ("\n" if pins else "")


def pipArguments(requirements: Sequence[str], constraintsFile: Optional[Path]) -> List[str]:
    """pip install arguments for ``requirements`` under the protecting constraints."""
    args = list(requirements)
    if constraintsFile is not None:
        args = ["-c", str(constraintsFile)] + args
    return args
