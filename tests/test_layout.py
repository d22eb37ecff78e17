"""The layout's rules, read from the source (issue 11): no import circle
between the project's modules, psp_firmware never imports hv (the trust
boundary), nothing outside hv/cli imports hv.cli, no module over 600 lines,
and hv/ itself keeps at most four plain modules.

Imports are read with ast (top-level and function-level alike: a lazy import
is still a dependency), not by importing the modules."""
import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hv", "psp_firmware", "nptcore", "guests")


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "build" in path.relative_to(ROOT).parts[1:2]:
                continue
            mods[_module_name(path)] = path
    return mods


MODULES = _modules()


def _resolve(importer, is_pkg, node):
    """Absolute names a `from X import a, b` / `import X` statement refers to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = importer if is_pkg else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    mod = node.module or ""
    if node.level:
        mod = f"{base}.{mod}" if mod else base
    # `from pkg import sub` names the submodule when there is one
    return [mod] + [f"{mod}.{a.name}" for a in node.names]


def imports_of(name):
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _resolve(name, path.name == "__init__.py", node):
                # the longest project module the name starts with
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}




def _edges():
    for m, deps in GRAPH.items():
        for d in deps:
            # a package's __init__ re-exporting from its own submodules, and a
            # submodule importing its package's __init__ only through them,
            # are folded: count module -> module edges between real modules
            if m.startswith(d + "."):      # a submodule importing its own package
                continue
            yield m, d


def find_cycle(graph):
    """One cycle in `graph` as a list of nodes, or None (iterative DFS)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for start in graph:
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        color[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = BLACK
                stack.pop()
                path.pop()
                continue
            if color.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            if color.get(nxt) == WHITE:
                color[nxt] = GREY
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def _graph():
    g = {m: set() for m in GRAPH}
    for a, b in _edges():
        g[a].add(b)
    return g


def test_cycle_finder_finds_a_planted_cycle():
    # the checker itself: a graph with a circle through three modules, and one without
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_reader_sees_lazy_and_relative_imports():
    # psp_firmware.psp imports .guest at the top and hv.cli.main imports its
    # subcommand modules: both must be seen, or the checks below mean nothing
    assert "psp_firmware.guest" in GRAPH["psp_firmware.psp"]
    assert "hv.cli.boot" in GRAPH["hv.cli.main"]
    assert "hv.vmm.vmm" in GRAPH["hv.cli.common"]          # a function-level import


def test_no_import_circle_between_modules():
    cycle = find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_psp_firmware_never_imports_hv():
    bad = {m: sorted(d for d in deps if d == "hv" or d.startswith("hv."))
           for m, deps in GRAPH.items() if m.startswith("psp_firmware")}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"the trusted side imports the untrusted one: {bad}"


def test_nothing_outside_the_cli_imports_it():
    bad = {m: sorted(d for d in deps if d.startswith("hv.cli"))
           for m, deps in GRAPH.items()
           if not m.startswith("hv.cli") and m != "hv.__main__"}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"modules importing the command line: {bad}"


def test_subcommands_never_import_the_entry_module():
    bad = [m for m, deps in GRAPH.items()
           if m.startswith("hv.cli.") and m != "hv.cli.main" and "hv.cli.main" in deps]
    assert not bad, bad


def test_psp_link_does_not_import_the_vmm():
    bad = {m: sorted(d for d in deps if d.startswith(("hv.vmm", "hv.machine", "hv.cli")))
           for m, deps in GRAPH.items() if m.startswith("hv.psp_link")}
    assert not {m: d for m, d in bad.items() if d}, bad


@pytest.mark.parametrize("pkg", ["hv", "psp_firmware"])
def test_no_module_over_600_lines(pkg):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_hv_keeps_at_most_four_plain_modules():
    plain = sorted(p.name for p in (ROOT / "hv").glob("*.py"))
    assert len(plain) <= 4, plain
    rooms = sorted(p.name for p in (ROOT / "hv").iterdir()
                   if p.is_dir() and (p / "__init__.py").exists())
    for room in rooms:        # every room says what lives there and what it may import
        doc = ast.get_docstring(ast.parse((ROOT / "hv" / room / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"hv/{room}/__init__.py: no docstring naming its imports"
