"""The house's shape, kept by a test: which package may import which (function-local imports included).

contracts/   imports nothing of ours (both processes build on it)
gateway/     never imports finetune/
finetune/    takes from gateway/ only the platform both processes run on: core, security, store
api/*/protocol.py   the wire types import nothing of ours
api/*/routes.py     never reach the engine (they go through a service)
gateway's sub-packages form no cycle
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = ("contracts", "gateway", "finetune")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module of ours that `path` imports, anywhere in the file (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 steps
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in OURS}


MODULES = {
    _module_name(path): _imports(path, _module_name(path))
    for top in OURS
    for path in sorted((REPO / top).rglob("*.py"))
}


def _violations(prefix: str, allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module, imported in MODULES.items():
        if module != prefix and not module.startswith(prefix + "."):
            continue
        for name in sorted(imported):
            if name.startswith(forbidden) and not name.startswith(allowed):
                bad.append(f"{module} imports {name}")
    return bad


def test_the_modules_were_found() -> None:
    assert (
        "gateway.app" in MODULES and "finetune.worker" in MODULES and "contracts.hyperparameters" in MODULES
    )


def test_contracts_import_nothing_of_either_process() -> None:
    assert _violations("contracts", (), ("gateway", "finetune")) == []


def test_the_gateway_never_imports_the_worker() -> None:
    assert _violations("gateway", (), ("finetune",)) == []


def test_the_worker_uses_only_the_gateways_platform() -> None:
    allowed = ("gateway.core", "gateway.security", "gateway.store")
    assert _violations("finetune", allowed, ("gateway",)) == []


def test_wire_types_import_nothing_of_ours() -> None:
    protocols = [m for m in MODULES if m.startswith("gateway.api.") and m.endswith(".protocol")]
    assert len(protocols) >= 4
    assert {m: sorted(MODULES[m]) for m in protocols if MODULES[m]} == {}


def test_routes_never_reach_the_engine() -> None:
    routes = [m for m in MODULES if m.startswith("gateway.api.") and m.endswith(".routes")]
    assert len(routes) >= 4
    bad = {m: sorted(n for n in MODULES[m] if n.startswith("gateway.engine")) for m in routes}
    assert {m: names for m, names in bad.items() if names} == {}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "gateway" and len(parts) > 1 else parts[0]


def test_gateway_packages_form_no_cycle() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, imported in MODULES.items():
        source = _package(module)
        if not source.startswith("gateway."):
            continue
        for name in imported:
            target = _package(name)
            if (
                target.startswith("gateway.")
                and target != source
                and target in {_package(m) for m in MODULES}
            ):
                graph[source].add(target)
    cycles = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_function_local_imports_are_seen(tmp_path: Path) -> None:
    """The kind of import that hid the crossings before: inside a function, and relative."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    from finetune.worker import Worker\n    from . import app\n    return Worker\n"
    )
    assert {"finetune.worker", "gateway.app"} <= _imports(sample, "gateway.sample")
