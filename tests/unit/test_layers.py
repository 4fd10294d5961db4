"""The README's rule of who imports whom, checked on every module's imports (function-level ones too).

Layers, bottom up: the ground (``fcmoe``: errors, config, model, logs, file I/O) imports nothing else of
the project; ``crypto`` and ``protos`` import the ground; the roles (``aggregator``, ``silo_agent``)
import those and never each other; the launch shell (``fcmoe.launch``, ``python -m fcmoe``) may
import anything. A package always imports itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fcmoe", "crypto", "protos", "aggregator", "silo_agent")
SHELL = ("fcmoe.launch", "fcmoe.__main__")
LAYER = {"fcmoe": 0, "crypto": 1, "protos": 1, "aggregator": 2, "silo_agent": 2, "shell": 3}


def package_of(module: str) -> str | None:
    """The layer unit a module belongs to: the shell, one of the packages, or None (not the project's)."""
    if any(module == s or module.startswith(s + ".") for s in SHELL):
        return "shell"
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source``, relative ones resolved against ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """One line per import that goes up a layer or across to another package of the same layer."""
    own = package_of(module)
    if own is None:
        return []
    wrong = []
    for line, name in imported_modules(module, source, is_package):
        target = package_of(name)
        if target is None or target == own:
            continue
        if LAYER[target] >= LAYER[own]:
            way = "up a layer" if LAYER[target] > LAYER[own] else "across to a sibling"
            wrong.append(f"{module}:{line} imports {name} ({way}: {own} -> {target})")
    return wrong


def project_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append((".".join(parts), path))
    return modules


def test_no_module_imports_up_a_layer_or_across_roles() -> None:
    modules = project_modules()
    assert len(modules) > 50  # the walk found the project
    wrong = [v for name, path in modules
             for v in violations(name.removesuffix(".__init__"), path.read_text(), path.name == "__init__.py")]
    assert wrong == []


@pytest.mark.parametrize("module, source, expected", [
    ("aggregator.coordinator", "from silo_agent.agent import SiloAgent", "across to a sibling: aggregator -> silo_agent"),
    ("silo_agent.client", "def f():\n    import aggregator.server\n", "across to a sibling: silo_agent -> aggregator"),
    ("crypto.pki", "from fcmoe.launch.cli import main", "up a layer: crypto -> shell"),
    ("crypto.masking", "from protos import codec", "across to a sibling: crypto -> protos"),
    ("fcmoe.config", "from crypto.secagg import SecAggError", "up a layer: fcmoe -> crypto"),
    ("fcmoe.model.build", "from ..launch import cli", "up a layer: fcmoe -> shell"),
    ("protos.codec", "import silo_agent.data", "up a layer: protos -> silo_agent"),
])
def test_a_wrong_import_is_caught(module: str, source: str, expected: str) -> None:
    [line] = violations(module, source)
    assert expected in line and module in line


@pytest.mark.parametrize("module, source", [
    ("fcmoe.launch.cli", "from aggregator.server import serve\nfrom silo_agent.agent import SiloAgent"),
    ("fcmoe.__main__", "from fcmoe.launch.cli import main"),
    ("aggregator.coordinator", "from crypto.secagg import mask_label\nfrom protos import codec\nfrom fcmoe import errors"),
    ("silo_agent.dp.trainer", "from ..training import TrainResult\nimport torch"),
    ("crypto.pki", "from fcmoe.errors import PkiError"),
])
def test_allowed_imports_pass(module: str, source: str) -> None:
    assert violations(module, source) == []
