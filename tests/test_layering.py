"""The import direction of the design: dht.records <- dht <- peer.wire <- verify <- client <- api; health
reads dht and verify; peer never imports client, verify or health; nothing but swarmllm imports api."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
OURS = ("dht", "peer", "client", "verify", "health", "api", "swarmllm")

# importer (module or package prefix) -> modules it may import from our packages
ALLOWED = {
    "dht.records": set(),
    "dht": {"dht"},
    "peer.wire": {"dht"},
    "peer": {"dht", "peer"},
    "verify": {"dht", "peer.wire", "verify"},
    "client": {"dht", "peer.wire", "peer.layout", "verify", "client"},  # peer.layout: loading the client's part
    "health": {"dht", "verify", "peer.wire", "health"},  # peer.wire: to ping peers' info RPC
    "api": {"client", "dht", "api"},  # the OpenAI API: generates through the client; dht for the ready line
    "swarmllm": set(OURS),
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in OURS}


def _rule(module: str) -> set[str]:
    best = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)
    return ALLOWED[best]


def _allowed(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_no_forbidden_import_edges():
    violations = []
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            module = _module_name(path)
            allowed = _rule(module)
            for target in _imports(path):
                # "from peer import wire" shows up as both "peer" and "peer.wire": judge the precise one
                if target in {"dht", "peer", "client", "verify", "health", "api"} and any(
                        t.startswith(target + ".") for t in _imports(path)):
                    continue
                if not _allowed(target, allowed):
                    violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_a_violation():
    assert not _allowed("client.swarm", _rule("peer.server"))
    assert not _allowed("peer.handler", _rule("client.model"))
    assert _allowed("peer.wire", _rule("client.model"))
    assert not _allowed("api.engine", _rule("client.model"))  # the client never depends on its API
    assert not _allowed("peer.wire", _rule("api.app"))
