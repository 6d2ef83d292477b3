"""Layer 1: the layout holds: dependencies go one way (sli -> runtime -> cache), no module
imports another that imports it back (imports inside functions count too), and group names
are defined once, beside the manifest."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "runtime", "sli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules a file imports, anywhere in it (TYPE_CHECKING blocks included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        # "from sli.offline import config" names a module; "from sli.offline.config import X" names its module
        graph[mod] = {n if n in files else n.rpartition(".")[0] for n in _imports(path)} & set(files)
        graph[mod].discard(mod)
    return graph


def test_dependencies_go_one_way():
    rank = {"cache": 0, "runtime": 1, "sli": 2}
    bad = [(m, d) for m, deps in _graph().items() for d in deps if rank[d.split(".")[0]] > rank[m.split(".")[0]]]
    assert not bad, f"imports against the direction sli -> runtime -> cache: {bad}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_the_offline_path_stands_apart():
    graph = _graph()
    offline = [m for m in graph if m.startswith("sli.offline")]
    assert {"sli.offline.sources", "sli.offline.config", "sli.offline.quantizer", "sli.offline.writer",
            "sli.offline.salience", "sli.offline.fetch"} <= set(offline)
    for m in offline:
        outside = {d for d in graph[m] if d.startswith("sli") and not d.startswith("sli.offline") and d != "sli.version"}
        assert not outside, f"{m} reaches into the rest of sli: {outside}"


def test_group_names_are_defined_once():
    pattern = re.compile(r"""["'](embed|head)["']|["']layer\.["']|f["']layer\.\{""")
    defined = ROOT / "cache" / "manifest.py"
    hits = []
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            if p == defined:
                continue
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if pattern.search(line) and "group" in line.lower():
                    hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "group names spelled outside cache/manifest.py:\n" + "\n".join(hits)
