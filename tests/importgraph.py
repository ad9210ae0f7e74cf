"""The import graph of the mixq package, read from its source files (nothing is imported).

`import_graph(root)` -> {module: set of the package's modules it imports}, counting every
import statement wherever it stands: at module level, inside functions, under `if`. Module
names follow pyproject.toml's `[tool.setuptools.package-dir]` (mixq.train -> train/,
mixq.compile -> compile/, mixq.runtime -> runtime/, mixq.models -> models/, mixq -> mixq/),
and a folder with an __init__.py below them is a subpackage (train/methods/ -> mixq.train.methods).
`from P import name` is an edge to the module P.name when there is one, else to P.

`find_cycle(graph, modules)` -> one import cycle among `modules` ([a, b, ..., a]) or None;
`imports_from(graph, modules, prefix)` -> the (module, imported) edges from `modules` into
the package `prefix` (e.g. "mixq.runtime").
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIRS = {"mixq": "mixq", "mixq.train": "train", "mixq.compile": "compile", "mixq.runtime": "runtime",
                "mixq.models": "models"}


def package_dirs(root) -> dict:
    """{package: directory} from root/pyproject.toml, or PACKAGE_DIRS when it has none."""
    try:
        import tomllib
        config = tomllib.loads((Path(root) / "pyproject.toml").read_text())
        dirs = config["tool"]["setuptools"]["package-dir"]
    except (ImportError, OSError, KeyError):
        dirs = PACKAGE_DIRS
    return {package: Path(root) / directory for package, directory in dirs.items()}


def module_files(root) -> dict:
    """{module name: source file} of every module of the package's directories, subpackages
    (folders with an __init__.py, e.g. train/methods/ -> mixq.train.methods) included."""
    modules = {}
    for package, directory in package_dirs(root).items():
        for path in sorted(Path(directory).rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if not all((path.parents[i] / "__init__.py").exists() for i in range(len(parts) - 1)):
                continue                             # in a folder that is no package
            names = [p for p in parts if p != "__init__"]
            modules[".".join([package, *names])] = path
    return modules


def _imported(node, module: str, is_package: bool, known) -> set:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:                                   # relative: from .x import y
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module
    found = set()
    for alias in node.names:
        target = f"{base}.{alias.name}"
        found.add(target if target in known else base)
    return {name for name in found if name in known}


def import_graph(root) -> dict:
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, path.stem == "__init__", files)
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict, modules) -> list | None:
    modules = set(modules)
    state = {}                                       # module -> "open" | "done"
    stack = []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in modules:
                continue
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(modules):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def imports_from(graph: dict, modules, prefix: str) -> set:
    return {(m, t) for m in modules for t in graph.get(m, ())
            if t == prefix or t.startswith(prefix + ".")}
