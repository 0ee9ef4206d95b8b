"""Dependencies point one way (docs/architecture.md): serve → gateway facade → catalog/cache → uplink.

Every `import` in agent/ (also those inside functions and under TYPE_CHECKING) is read with ast; an import
from a higher layer fails the test, naming the module, the line and the import; so does a cycle of modules
(within one layer too): the lower module declares what it needs, shared types go to a neutral module.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"

# Lowest first; a module may import its own layer and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # agent.audit imports nothing of the agent: the login guard (agent.auth) records bans through it.
    ("base", ("agent", "agent.records", "agent.config", "agent.auth", "agent.audit", "agent.metrics", "agent.logs",
              "agent.hahook", "agent.supervise")),
    ("policy", ("agent.policy",)),
    ("uplink", ("agent.uplink",)),
    # agent.dicom reads headers and decides retention above the uplink: the uplink gets what it needs handed in.
    ("store", ("agent.store", "agent.dicom")),
    ("services", ("agent.serve", "agent.sim", "agent.prefetcher", "agent.monitor", "agent.fsck",
                  "agent.selfcheck", "agent.dicom.reindex", "agent.dicom.reapply", "agent.dicom.snapshot",
                  "agent.dicom.deltas", "agent.ha")),
    ("wiring", ("agent.daemon", "agent.cli", "agent.dicom.commands", "agent.workers", "agent.worker")),
]
# Front ends see the facade and its vocabulary (errors, path rules), not the catalog, cache or uplink.
FACADE = ("agent.store.gateway", "agent.store.errors", "agent.store.paths")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(module: str, prefix: str) -> bool:
    return module == prefix or (prefix != "agent" and module.startswith(prefix + "."))


def layer_of(module: str) -> int:
    matches = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if within(module, p)]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")
    return max(matches)[1]


def agent_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "agent" or n.startswith("agent.")]
    return found


def violations(root: Path = AGENT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        src = module_name(path, root)
        for lineno, target in agent_imports(path):
            where = f"{path.relative_to(root.parent)}:{lineno} imports {target}"
            if layer_of(target) > layer_of(src):
                bad.append(f"{where} ({LAYERS[layer_of(src)][0]} → {LAYERS[layer_of(target)][0]}: upward)")
            elif within(src, "agent.serve") and within(target, "agent.store") and \
                    not any(within(target, f) for f in FACADE):
                bad.append(f"{where} (a front end past the gateway facade)")
            elif within(src, "agent.serve") and within(target, "agent.uplink"):
                bad.append(f"{where} (a front end past the gateway facade)")
    return bad


def test_no_upward_imports_in_agent():
    assert violations() == []


def import_graph(root: Path = AGENT) -> dict[str, set[str]]:
    """Module → the agent modules it imports (`from agent.x import y` names agent.x.y when y is a module)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        graph[name] = targets - {name}
    return graph


def cycles(root: Path = AGENT) -> list[list[str]]:
    """The import cycles among agent modules: each strongly connected set of two or more, sorted (Tarjan)."""
    graph, index, low, stack, found = import_graph(root), {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            ring = []
            while not ring or ring[-1] != v:
                ring.append(stack.pop())
            if len(ring) > 1:
                found.append(sorted(ring))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles_in_agent():
    assert cycles() == []


def test_an_import_cycle_is_caught(tmp_path):
    """A cycle through a lazy import and through `from package import module` is found; a chain is not."""
    fake = tmp_path / "agent"
    (fake / "policy").mkdir(parents=True)
    (fake / "auth.py").write_text("from agent.config import LoginConfig\n")
    (fake / "config.py").write_text("def f():\n    from agent.auth import parse_hash\n")
    (fake / "policy" / "a.py").write_text("from agent.policy import b\n")
    (fake / "policy" / "b.py").write_text("from agent.policy.c import X\n")
    (fake / "policy" / "c.py").write_text("import agent.policy.a\nfrom agent import records\n")
    (fake / "records.py").write_text("")
    assert cycles(fake) == [["agent.auth", "agent.config"], ["agent.policy.a", "agent.policy.b", "agent.policy.c"]]


def test_uplink_imports_nothing_from_store_or_dicom():
    """What the uplink needs of the catalog, the cache, the WORM policy and the DICOM describer is handed in."""
    uplink = [(p, t) for p in (AGENT / "uplink").rglob("*.py") for _, t in agent_imports(p)]
    assert uplink, "the walk found no imports at all: it is not looking at agent/uplink"
    assert [f"{p.name}: {t}" for p, t in uplink if within(t, "agent.store") or within(t, "agent.dicom")] == []


def test_policy_decides_without_the_rest_of_the_agent():
    """agent/policy does no I/O and knows no other part: it imports only itself."""
    imports = {t for p in (AGENT / "policy").rglob("*.py") for _, t in agent_imports(p)}
    assert {t for t in imports if not within(t, "agent.policy")} == set()


def test_an_upward_import_is_caught(tmp_path):
    """The walk really fails on a wrong import (here: the uplink reaching up into the catalog)."""
    fake = tmp_path / "agent"
    (fake / "uplink").mkdir(parents=True)
    (fake / "uplink" / "bad.py").write_text("def f():\n    from agent.store.catalog import Catalog\n")
    (fake / "serve").mkdir()
    (fake / "serve" / "worse.py").write_text("from agent.store.cache import Cache\n")
    found = violations(fake)
    assert any("uplink/bad.py:2 imports agent.store.catalog" in v and "upward" in v for v in found), found
    assert any("serve/worse.py:1" in v and "facade" in v for v in found), found


def facade_methods() -> set[str]:
    """The public methods and properties of the Gateway class (agent/store/gateway.py)."""
    tree = ast.parse((AGENT / "store" / "gateway.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Gateway")
    return {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not n.name.startswith("_")}


def reach_throughs(root: Path = AGENT) -> list[str]:
    """Uses of a gateway (`gateway.x`, `gw.x`, `self.gateway.x`, read or set) anywhere in agent/ outside
    agent/store/gateway.py that are not facade methods: its audit log, metrics, cache, catalog, evictor and
    refusals are its own (the daemon builds the parts it hands in and keeps those others need)."""
    allowed, bad = facade_methods(), []
    for path in sorted(root.rglob("*.py")):
        if path == root / "store" / "gateway.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name in ("gateway", "gw") and node.attr not in allowed:
                bad.append(f"{path.relative_to(root.parent)}:{node.lineno} uses {name}.{node.attr}")
    return bad


def test_the_agent_calls_only_the_facade_methods(tmp_path):
    assert {"stat", "open_read", "open_write", "audit_event", "count_error", "prefetch"} <= facade_methods()
    assert reach_throughs() == []
    fake = tmp_path / "agent"
    (fake / "serve").mkdir(parents=True)
    (fake / "store").mkdir()
    (fake / "store" / "gateway.py").write_text((AGENT / "store" / "gateway.py").read_text())
    (fake / "serve" / "bad.py").write_text("def f(self, gw):\n    gw.stat('a')\n    self.gateway.audit.record()\n")
    (fake / "monitor.py").write_text("def f(gateway):\n    gateway.fetch_refusal = 'x'\n    gateway.evictor.plan()\n")
    assert reach_throughs(fake) == ["agent/monitor.py:2 uses gateway.fetch_refusal", "agent/monitor.py:3 uses "
                                    "gateway.evictor", "agent/serve/bad.py:3 uses gateway.audit"]
