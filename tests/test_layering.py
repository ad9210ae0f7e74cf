"""The import graph of the mixq package, read from its source files (no import is run):
tests/importgraph.py, which counts every `import` and `from ... import` of a mixq module, at
module level or inside a function, relative ones too, and maps modules to files through
pyproject.toml's package-dir (mixq -> mixq/, mixq.train -> train/, ...). What it asserts
(README, "Layout": imports follow the pipeline):

  - no import cycle between modules (compile/'s own modules included);
  - stages import downward only: models <- train <- freeze (mixq/freeze.py, mixq/intsim.py)
    <- compile <- runtime; a stage may import its own modules and the core;
  - the core (the integer contract mixq/graph.py, mixq/fsio.py, mixq/errors.py, mixq/data.py)
    imports no stage;
  - the commands above the stages (mixq/cli.py, api.py, report.py, inspect.py, ...) may import anything.

An import names the module it imports (`from mixq.train import quant` imports mixq.train.quant);
the parent packages Python runs on the way are not counted (a package's __init__ importing its
own submodules is no cycle)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import importgraph

REPO = Path(__file__).resolve().parents[1]

CORE = {"mixq", "mixq.graph", "mixq.fsio", "mixq.errors", "mixq.data"}
COMMANDS = {"mixq.cli", "mixq.api", "mixq.train_command", "mixq.report", "mixq.inspect", "mixq.evaluate",
            "mixq.onnx_export", "mixq.sweep"}
STAGES = [("models", ("mixq.models",)), ("train", ("mixq.train",)), ("freeze", ("mixq.freeze", "mixq.intsim")),
          ("compile", ("mixq.compile",)), ("runtime", ("mixq.runtime",))]


def setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def stage_of(module: str):
    """(rank, stage) of a module: the core 0, then the stages in order; None for a command."""
    if module in COMMANDS:
        return None
    if module in CORE:
        return 0, "core"
    for rank, (stage, prefixes) in enumerate(STAGES, 1):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank, stage
    raise AssertionError(f"{module}: not assigned to a stage, the core or the commands in tests/test_layering.py")


@pytest.fixture(scope="module")
def graph() -> dict:
    return importgraph.import_graph(REPO)


def test_the_walk_sees_the_whole_package(graph):
    # every folder with an __init__.py is a package setuptools installs, and the walk found
    # the modules this test is about
    packages = set(setuptools_config()["packages"])
    missing = sorted(name for name, path in importgraph.module_files(REPO).items()
                     if path.name == "__init__.py" and name not in packages)
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {missing}"
    for module in ("mixq.graph", "mixq.fsio", "mixq.freeze", "mixq.intsim", "mixq.train.loop",
                   "mixq.train.methods.csq", "mixq.compile.build", "mixq.runtime.deploy", "mixq.models"):
        assert module in graph
    assert "mixq.train.quant" in graph["mixq.freeze"]                    # `from mixq.train import quant`
    assert "mixq.freeze" in graph["mixq.intsim"]
    for module in graph:
        stage_of(module)                                                # every module is placed


def test_no_import_cycle(graph):
    cycle = importgraph.find_cycle(graph, graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stages_import_downward_only(graph):
    wrong = []
    for module, deps in sorted(graph.items()):
        mine = stage_of(module)
        if mine is None:                                                # a command: anything
            continue
        for dep in sorted(deps):
            theirs = stage_of(dep)
            if theirs is None or theirs[0] > mine[0]:
                wrong.append(f"{module} ({mine[1]}) imports {dep} ({'a command' if theirs is None else theirs[1]})")
    assert not wrong, "imports against the pipeline's direction:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", ["mixq.graph", "mixq.fsio"])
def test_the_contract_and_file_io_import_no_stage(graph, module):
    stages = ("mixq.train", "mixq.compile", "mixq.runtime", "mixq.freeze", "mixq.intsim", "mixq.models")
    assert not [d for d in graph[module] if d.startswith(stages)], graph[module]


def test_train_stage_knows_nothing_of_freeze(graph):
    train = {m: deps for m, deps in graph.items() if m.startswith("mixq.train.")}
    assert train and not {d for deps in train.values() for d in deps if d in ("mixq.freeze", "mixq.intsim")}
