"""The package dependency rules of design.md, checked on the imports (ast) of every module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"core", "api", "worker", "model", "nexusgen", "migrations"}
# Importing any of these loads torch.
TORCH = {"torch", "torchvision", "transformers", "diffusers", "accelerate", "deepspeed"}

# package -> top-level names it must never import (directly, lazily inside functions, or relatively)
FORBIDDEN = {
    "model": {"core", "api", "worker", "nexusgen", "migrations"},
    "core": TORCH | {"api", "worker", "model", "nexusgen"},
    "api": TORCH | {"worker", "model", "nexusgen", "migrations"},
    "worker": {"api", "nexusgen", "migrations"},
    "migrations": TORCH | {"api", "worker", "model", "nexusgen"},
}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_top_levels(path: Path, root: Path = ROOT) -> set[str]:
    """Top-level package names a module imports anywhere in its body; relative imports resolved."""
    package_parts = path.relative_to(root).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the package unless it climbs out of it
                base = package_parts[: len(package_parts) - (node.level - 1)]
                names.add(base[0] if base else (node.module or "").split(".")[0])
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


CASES = [(package, path) for package in FORBIDDEN for path in modules(package)]


def test_every_package_has_modules() -> None:
    for package in ("model", "core", "api", "worker"):
        assert modules(package), f"{package}/ has no modules"


@pytest.mark.parametrize(("package", "path"), CASES, ids=[str(p.relative_to(ROOT)) for _, p in CASES])
def test_imports_follow_the_dependency_rules(package: str, path: Path) -> None:
    bad = imported_top_levels(path) & FORBIDDEN[package]
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}, which {package}/ must not"


def test_api_imports_only_core_of_our_packages() -> None:
    for path in modules("api"):
        ours = imported_top_levels(path) & OURS
        assert ours <= {"core", "api"}, f"{path.relative_to(ROOT)} imports {sorted(ours - {'core', 'api'})}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "model" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    import core.db\n\nfrom . import config\nfrom ..api import app\n")
    assert imported_top_levels(probe, root=tmp_path) == {"core", "model", "api"}


def _loaded_after_import(*modules_to_import: str) -> set[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {list(modules_to_import)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_api_process_never_loads_torch() -> None:
    """Transitively too: importing the app (and every api and core module) leaves torch unloaded."""
    names = [f"api.{p.stem}" for p in modules("api") if p.stem != "__init__"]
    names += [f"core.{p.stem}" for p in modules("core") if p.stem != "__init__"]
    loaded = _loaded_after_import("api.app", *names)
    assert "api" in loaded and not (loaded & TORCH)
