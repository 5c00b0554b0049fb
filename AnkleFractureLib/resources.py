"""Where the shipped resources (model weights, the healthy template) live.

The library looks in, in order: the folder named by the environment variable
``ANKLE_FRACTURE_RESOURCES``; ``Resources/`` next to the ``AnkleFractureLib`` package (a source
checkout, an editable install, or the Slicer extension, which installs both side by side).
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from AnkleFractureLib.errors import InputError

ENV_VAR = "ANKLE_FRACTURE_RESOURCES"


def resources_dir() -> Path:
    """The Resources folder (raises InputError when it cannot be found)."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_dir():
            raise InputError(path, f"{ENV_VAR} points to a folder that does not exist")
        return path
    path = Path(__file__).resolve().parent.parent / "Resources"
    if not path.is_dir():
        raise InputError(path, "the Resources folder was not found next to AnkleFractureLib; "
                               f"set {ENV_VAR} to its location")
    return path


def resource_path(*parts: str) -> Path:
    """Path of a file or folder under the Resources folder (existence is not checked)."""
    return resources_dir().joinpath(*parts)
