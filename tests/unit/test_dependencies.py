"""Every third-party package the product imports is declared in pyproject.toml (not merely installed because
something else pulled it in)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = {"contracts", "gateway", "finetune"}


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for top in OURS:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in OURS and n not in sys.stdlib_module_names and n != "__future__"}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"]
    return {re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-") for req in requirements}


def test_every_imported_package_is_a_declared_dependency() -> None:
    distributions = packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        providers = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if not providers & declared:
            missing[module] = sorted(providers) or ["(not installed)"]
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"
