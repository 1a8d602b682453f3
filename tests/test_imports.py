"""The project's import graph: every import of a project module, at module level or inside a function, goes one way."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "shared", "__pycache__"}


def project_files(root: Path) -> dict:
    """Module name (dotted path from the repository root) -> file, for every .py file of the project."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIP.intersection(parts):
            continue
        name = list(parts[:-1]) + ([] if parts[-1] == "__init__.py" else [parts[-1][:-3]])
        modules[".".join(name)] = path
    return modules


def is_package_dir(folder: Path) -> bool:
    """Whether a folder is a package (its modules are imported by dotted name, not as bare script neighbours)."""
    return (folder / "__init__.py").exists()


def resolve(name: str, importer: str, modules: dict, root: Path):
    """The project module an imported dotted name loads, or None: the longest known prefix, from the root or, for a
    script folder (tests/, bench/, scripts/: on sys.path when its files run), from that folder."""
    bases = [""]
    folder = modules[importer].parent
    if folder != root and not is_package_dir(folder):
        bases.insert(0, ".".join(folder.relative_to(root).parts) + ".")
    for base in bases:
        parts = (base + name).split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                return candidate
    return None


def imported_names(tree: ast.AST, importer: str, is_package: bool):
    """Every dotted name an import anywhere in the tree loads: `from X import Y` gives X.Y, which resolves to the
    submodule X.Y when there is one and to X when Y is a name in it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            yield from (base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)


def import_graph(root: Path = REPO) -> dict:
    """Module -> the set of project modules it imports (no self edges: `from pkg import sub` inside pkg/__init__)."""
    modules = project_files(root)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {resolve(imported, name, modules, root)
                   for imported in imported_names(tree, name, path.name == "__init__.py")}
        graph[name] = {target for target in targets if target and target != name}
    return graph


def shortest_cycle_through(graph: dict, start: str):
    """The shortest import cycle from start back to it (start repeated at the end), or None: a breadth-first search."""
    came_from = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target == start:
                    back = [start]
                    while node != start:
                        back.append(node)
                        node = came_from[node]
                    return [start] + back[::-1]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    return None


def import_cycles(graph: dict) -> list:
    """One shortest cycle for each set of modules that import each other, so a failure names every cycle."""
    cycles, seen = [], set()
    for module in sorted(graph):
        cycle = shortest_cycle_through(graph, module)
        if cycle and frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            cycles.append(cycle)
    return cycles


def test_project_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 100 and "trainer.loop" in graph["train_text_to_image"]  # the whole project was read
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_function_level_and_from_imports_make_edges(tmp_path):
    """A cycle hidden in a function body, or made by `from pkg import module`, is found."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "low.py").write_text("def f():\n    from pkg.high import g\n    return g\n")
    (tmp_path / "pkg" / "high.py").write_text("from pkg import low\n")
    (tmp_path / "pkg" / "other.py").write_text("import pkg.low\nfrom . import high\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.low"] == {"pkg.high"} and graph["pkg.high"] == {"pkg.low"}
    assert graph["pkg.other"] == {"pkg.low", "pkg.high"}
    assert import_cycles(graph) == [["pkg.high", "pkg.low", "pkg.high"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"d", "a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": set()}) == []
