"""pyproject.toml's dependencies: true floors, torch only for the tests, and the pins that
`.ci/min-versions` derives from them (it installs exactly those and runs the main job)."""

import ast
import importlib.machinery
import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {extra: [Requirement(r) for r in reqs] for extra, reqs in PROJECT["optional-dependencies"].items()}
SCRIPT = ROOT / ".ci" / "min-versions"
# declared only to pin it with jax (jax's own requirement on it differs between releases)
NOT_IMPORTED = {"jaxlib"}
# distributions whose top-level module has another name
IMPORT_NAMES = {"orbax-checkpoint": "orbax"}


def floor(requirement: Requirement) -> str | None:
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    return floors[0] if len(floors) == 1 else None


def imported_modules() -> dict[str, list[str]]:
    """Top-level module -> files of src/blockdistill that import it (anywhere in the file)."""
    found: dict[str, list[str]] = {}
    for file in sorted((ROOT / "src" / "blockdistill").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(file.name)
    return found


def load_script():
    loader = importlib.machinery.SourceFileLoader("min_versions", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("requirement", RUNTIME, ids=str)
def test_every_runtime_dependency_has_a_floor(requirement):
    assert floor(requirement) is not None, f"{requirement} needs exactly one >= lower bound"
    assert not requirement.marker and not requirement.extras, requirement


def test_runtime_dependencies_are_what_the_library_imports():
    imported = imported_modules()
    declared = {canonicalize_name(r.name) for r in RUNTIME}
    unused = sorted(d for d in declared - NOT_IMPORTED if IMPORT_NAMES.get(d, d) not in imported)
    assert not unused, f"runtime dependencies the library never imports: {unused}"
    assert "jaxlib" in declared
    jax, jaxlib = (next(r for r in RUNTIME if r.name == name) for name in ("jax", "jaxlib"))
    assert floor(jax) == floor(jaxlib), (str(jax), str(jaxlib))


def test_hf_extra_is_what_the_hf_interop_imports():
    imported = imported_modules()
    for requirement in EXTRAS["hf"]:
        assert floor(requirement) is not None, requirement
        assert requirement.name in imported, f"the library never imports {requirement.name}"


def test_torch_is_only_a_pinned_test_dependency():
    assert "torch" not in {canonicalize_name(r.name) for r in RUNTIME}
    for extra, requirements in EXTRAS.items():
        torch = [r for r in requirements if canonicalize_name(r.name) == "torch"]
        if extra == "test":
            assert [str(r.specifier) for r in torch] == ["==2.13.0"], torch
        else:
            assert not torch, f"the {extra} extra must not force torch on users"


@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_library_never_imports(module):
    assert module not in imported_modules(), imported_modules()[module]


def test_min_versions_pins_are_the_declared_floors():
    expected = {r.name: floor(r) for r in RUNTIME + EXTRAS["hf"]}
    assert load_script().derive_pins() == expected
    assert os.access(SCRIPT, os.X_OK)
    printed = subprocess.run([sys.executable, str(SCRIPT), "--print-constraints"],
                             capture_output=True, text=True, check=True).stdout
    assert printed.splitlines() == [f"{name}=={version}" for name, version in expected.items()]
    assert ".ci/min-versions" in (ROOT / ".ci" / "run").read_text()


def test_min_versions_derivation(tmp_path):
    script = load_script()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["a>=1.2", "B_c[x] >= 0.3, <2", "d==4"]\n'
        '[project.optional-dependencies]\nhf = ["e>=5.0; python_version >= \'3.11\'"]\n'
        'test = ["f"]\n'
    )
    assert script.derive_pins(pyproject) == {"a": "1.2", "B_c": "0.3", "d": "4", "e": "5.0"}
    pyproject.write_text('[project]\ndependencies = ["a<2"]\n[project.optional-dependencies]\nhf = []\n')
    with pytest.raises(ValueError, match="no lower bound"):
        script.derive_pins(pyproject)
    assert script.same_version("2.0", "2.0.0") and not script.same_version("2.0.1", "2.0")
