"""The install claims are true: the declared Python minimum, the README and scripts/install.sh.

CI runs the suite on one interpreter; this checks that it meets ``requires-python``, that the
minimum is not below what the installed torch and monai need, that the README states the same
minimum, and that ``scripts/install.sh`` prefers the PyTorch CPU wheel index and falls back
quickly (with a message) when it is not reachable.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def requires_python() -> str:
    """``[project] requires-python`` of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # 3.10: the one line is enough
        match = re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.MULTILINE)
        assert match, "pyproject.toml has no requires-python"
        return match.group(1)
    return tomllib.loads(text)["project"]["requires-python"]


def minimum(spec: str) -> Tuple[int, int]:
    """(major, minor) of a ``>=X.Y`` specifier."""
    match = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", spec)
    assert match, f"requires-python should be a plain '>=X.Y', got {spec!r}"
    return int(match.group(1)), int(match.group(2))


def test_running_interpreter_meets_requires_python():
    spec = requires_python()
    assert minimum(spec) == (3, 10), spec
    assert sys.version_info[:2] >= minimum(spec), (
        f"Python {sys.version.split()[0]} does not satisfy requires-python {spec!r}")
    packaging = pytest.importorskip("packaging.specifiers")
    assert packaging.SpecifierSet(spec).contains(
        f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}")


@pytest.mark.parametrize("package", ["torch", "monai"])
def test_minimum_is_not_below_what_torch_and_monai_need(package):
    needed = importlib.metadata.metadata(package).get("Requires-Python")
    if not needed:
        pytest.skip(f"{package} declares no Requires-Python")
    floors = [tuple(int(v) for v in m.groups())
              for m in re.finditer(r">=\s*(\d+)\.(\d+)", needed)]
    assert floors, needed
    assert minimum(requires_python()) >= max(floors), (
        f"{package} {importlib.metadata.version(package)} needs Python {needed}, "
        f"but pyproject says {requires_python()}")


def test_readme_states_the_same_minimum():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    major, minor = minimum(requires_python())
    stated = set(re.findall(r"Python (\d+\.\d+) or newer", readme))
    assert stated == {f"{major}.{minor}"}, stated
    assert "Python 3.9 or newer" not in readme


def test_readme_does_not_promise_a_cpu_build_everywhere():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "no multi-GB CUDA build is pulled" not in readme
    assert CPU_INDEX in readme and "CUDA build" in readme


def test_install_script_prefers_the_cpu_index_and_says_when_it_falls_back():
    text = INSTALL.read_text(encoding="utf-8")
    assert CPU_INDEX in text and "torch==2.13.0" in text
    assert "timeout=5" in text  # a short probe: no long wait offline
    assert "not reachable; falling back" in text
    assert "(3, 10)" in text  # refuses an older interpreter with a message


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_install_script_parses_and_its_torch_plan_is_quick():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TORCH_INDEX_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(INSTALL), "--torch-plan"], capture_output=True,
                          text=True, env=env, timeout=60)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    assert args[-1] == "torch==2.13.0"
    if "--index-url" in args:  # the CPU index answered
        assert args[args.index("--index-url") + 1] == CPU_INDEX
        assert "installing torch==2.13.0 from " + CPU_INDEX in proc.stderr
    else:  # offline (as on the CI machine): the plain install, said plainly, and quickly
        assert args == ["torch==2.13.0"]
        assert "not reachable; falling back" in proc.stderr
        assert seconds < 15, seconds


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_install_script_falls_back_for_an_unreachable_index():
    env = dict(os.environ, PYTHON=sys.executable,
               TORCH_INDEX_URL="http://127.0.0.1:9/no-index")  # port 9: nothing listens
    proc = subprocess.run(["bash", str(INSTALL), "--torch-plan"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch==2.13.0"]
    assert "http://127.0.0.1:9/no-index is not reachable; falling back" in proc.stderr
