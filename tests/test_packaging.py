"""What a wheel install of pacsgw gets: every library it imports declared, and the shipped model inside."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from devstack import EXAMPLE_ACCESS_KEY, EXAMPLE_SECRET_KEY

REPO = Path(__file__).resolve().parents[1]
# Modules of an extra: they run only when it is installed ([smb] enabled), so they may import it at the top.
EXTRA_MODULES = {"agent/serve/fuse.py": "smb"}
# Imported inside a try as a fallback, deliberately not declared.
UNDECLARED_FALLBACKS = {
    "tflite-runtime",  # LiteRT's predecessor on older boxes; predictor.py prefers ai-edge-litert
    "tensorflow",      # `pacsgw train` says to install the [train] extra (its own venv) when it is missing
}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        parsed = [Requirement(r) for r in reqs]
        return {canonicalize_name(r.name) for r in parsed if r.marker is None or r.marker.evaluate()}
    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def _imports() -> list[tuple[str, str, bool]]:
    """(file, top-level module, imported when the module is imported) for every non-stdlib import."""
    found = []
    for path in sorted((REPO / "agent").rglob("*.py")):
        tree = ast.parse(path.read_text())
        lazy = {id(n) for outer in ast.walk(tree) if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try))
                for n in ast.walk(outer) if n is not outer}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top != "agent" and top not in sys.stdlib_module_names:
                    found.append((str(path.relative_to(REPO)), top, id(node) not in lazy))
    return found


def _distribution(module: str) -> str:
    dists = importlib.metadata.packages_distributions().get(module)
    return canonicalize_name(dists[0]) if dists else canonicalize_name(module.replace("_", "-"))


def test_every_imported_library_is_declared():
    base, extras = _declared()
    in_extras = set().union(*extras.values())
    problems = []
    for path, module, eager in _imports():
        dist = _distribution(module)
        extra = EXTRA_MODULES.get(path)
        if eager and dist not in base and not (extra and dist in extras[extra]):
            problems.append(f"{path} imports {module} ({dist}) at load time: not in [project] dependencies")
        elif dist not in base | in_extras | UNDECLARED_FALLBACKS:
            problems.append(f"{path} imports {module} ({dist}): declared nowhere in pyproject.toml")
    assert problems == []


def test_every_declared_dependency_is_imported():
    base, _ = _declared()
    imported = {_distribution(m) for _, m, _ in _imports()}
    assert base - imported == set()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # From a copy of the tree: setuptools builds in place, and an old build/lib would leak into the wheel.
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv*", "build", "run", ".git", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=600, capture_output=True)
    return next((tmp_path / "dist").glob("pacsgw-*.whl"))


def test_wheel_ships_no_test_servers_and_no_example_keys(wheel):
    """The loopback servers of make run and the tests (tests/devstack.py) and their example keys stay out of
    what a box installs: the wheel holds the agent package and its metadata only."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert [n for n in names if not n.startswith(("agent/", "pacsgw-"))] == []
        assert [n for n in names if "devstack" in n] == []
        keys = (EXAMPLE_ACCESS_KEY.encode(), EXAMPLE_SECRET_KEY.encode())
        assert [n for n in names if any(k in z.read(n) for k in keys)] == []


def test_wheel_carries_the_model(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert {"agent/policy/model/hotness.tflite", "agent/policy/model/hotness.card.json"} <= set(names)
    assert not any(n.startswith("agent/policy/model/") and n.endswith(".py") for n in names)
    # Installed from the wheel (not this tree), the predictor finds the model there and loads it.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    probe = ("import agent.policy.predictor as p; print(p.__file__); print(p.DEFAULT_MODEL); "
             "print(p.HotnessPredictor().version)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, timeout=120).stdout.split("\n")
    assert out[0].startswith(str(target)) and out[1].startswith(str(target)), out
    assert out[2], out
