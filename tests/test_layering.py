"""The floors of the design, enforced on every import (lazy ones inside functions too):

    swarmllm, bench                        (top: may import anything)
    api, health, sim                       (use client/peer only through their packages' __all__)
    client        peer                     (side by side: neither imports the other)
    verify                                 (pure policy, comparison, auditor, reputation)
    dht           wire      layout         (ground floor: the directory, the wire contract, the model layout)

and no import circle anywhere."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
OURS = ("wire", "layout", "dht", "verify", "peer", "client", "health", "api", "sim", "swarmllm", "bench")
SIDES = ("peer", "client")  # what upper floors may only use through the package's own __all__

# importer (module or package prefix) -> our packages it may import from
ALLOWED = {
    "wire": {"wire"},
    "layout": {"layout"},
    "dht.records": set(),
    "dht": {"dht"},
    "verify": {"dht", "wire", "verify"},
    "peer": {"dht", "wire", "layout", "peer"},
    "client": {"dht", "wire", "layout", "verify", "client"},
    "health": {"dht", "wire", "verify", "health"},  # wire: to ping peers' info RPC
    "api": {"dht", "client", "api"},  # generates through the client; dht for the ready line
    "sim": {"dht", "peer", "client", "sim"},  # runs the real placement and routing (public surfaces)
    "swarmllm": set(OURS),
    "bench": set(OURS),
}



def _parse(source: str) -> ast.Module:
    """ast.parse, once more on CPython 3.11.7's spurious "AST constructor recursion depth mismatch"
    (a SystemError seen once in a full CI run, gh-106905: its depth bookkeeping, not our source)."""
    try:
        return ast.parse(source)
    except SystemError:
        return ast.parse(source)

def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in OURS:
        if (ROOT / package).is_dir():
            for path in sorted((ROOT / package).rglob("*.py")):
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _type_only(tree: ast.AST) -> set[ast.AST]:
    """Import statements under ``if TYPE_CHECKING:`` (never run: annotations only)."""
    return {n for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for stmt in node.body for n in ast.walk(stmt)}


def _edges(path: pathlib.Path, *, runtime_only: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """(module imported from, names) for every import of ours in the file; names empty for ``import x``.
    ``runtime_only``: leave out the imports under ``if TYPE_CHECKING:``."""
    out = []
    tree = _parse(path.read_text())
    skip = _type_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names if a.name.split(".")[0] in OURS]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in OURS:
            out.append((node.module, tuple(a.name for a in node.names)))
    return out


def _targets(module: str, names: tuple[str, ...]) -> set[str]:
    """The modules of ours an import statement loads: ``from peer import placement`` loads peer.placement (and peer)."""
    hit = {module} | {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    return {t for t in hit if t in MODULES}


def _rule(module: str) -> set[str]:
    best = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)
    return ALLOWED[best]


def _allowed(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def _public(package: str) -> set[str]:
    tree = _parse((ROOT / package / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def violations() -> list[str]:
    bad = []
    for module, path in MODULES.items():
        allowed, top = _rule(module), module.split(".")[0]
        for target, names in _edges(path):
            if not _allowed(target, allowed):
                bad.append(f"{module} imports {target}")
            elif target.split(".")[0] in SIDES and top not in SIDES and top not in ("swarmllm", "bench"):
                side = target.split(".")[0]
                if target != side or not set(names) <= _public(side):
                    bad.append(f"{module} imports {target} {list(names)}: only {side}'s __all__ is public")
    return bad


def import_graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names in _edges(path, runtime_only=True):  # a type-only import cannot make a circle
            graph[module] |= _targets(target, names) - {module}
    # a submodule loading its own package's __init__ is how Python imports it, not a circle
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_no_forbidden_import_edges():
    assert not violations(), "\n".join(violations())


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_client_and_peer_stand_side_by_side():
    for module in MODULES:
        for side, other in (("client", "peer"), ("peer", "client")):
            if module.split(".")[0] == side:
                assert not any(t.split(".")[0] == other for t, _ in _edges(MODULES[module])), module


def test_the_rules_catch_violations():
    assert not _allowed("client.swarm", _rule("peer.server"))
    assert not _allowed("peer.handler", _rule("client.model"))
    assert _allowed("wire", _rule("client.model")) and _allowed("layout.parts", _rule("peer.blocks"))
    assert not _allowed("peer", _rule("wire.messages")) and not _allowed("wire", _rule("layout.hub"))
    assert not _allowed("api.engine", _rule("client.model"))  # the client never depends on its API
    assert not _allowed("wire", _rule("api.app"))
    assert "routing" in _public("client") and "swarm" not in _public("client")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "layout" in graph["peer.blocks"] and "layout.hub" in graph["layout.parts"]
    assert "client.session" in graph["client.swarm"] and "client.swarm" not in graph["client.session"]  # type-only
    assert "client.swarm" in {t for t, _ in _edges(MODULES["client.session"])}
