"""The import structure: dependencies point one way, as `LAYERS` says, with no cycle and no private
name imported from another package. Every import counts, also one inside a function.

The rule is data: each package or module of the repository names the ones directly below it, and
it may import anything below those, transitively (the numerical core at the bottom, the readers,
analysis, results, study, benchmarks, evaluate, at the top):
kernels <- ode <- layers <- controllers <- models <- train <- readers.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("stepjax", "benchmarks", "experiments")

LAYERS = {
    "stepjax.errors": [],  # exit statuses and the user-error type: importable from every layer
    "stepjax.figures": [],  # how every figure is drawn and stored (matplotlib, 256-colour PNG)
    "stepjax.kernels": [],  # the CPU backend's oneDNN convolutions (XLA FFI) and a lowering
    "stepjax.ode": ["stepjax.errors", "stepjax.kernels"],
    "stepjax.layers": ["stepjax.ode", "stepjax.kernels"],
    "stepjax.controllers": ["stepjax.layers"],
    "stepjax.models": ["stepjax.controllers"],
    "stepjax.data": ["stepjax.errors"],
    "stepjax.parallel": ["stepjax.errors"],
    "stepjax.records": ["stepjax.errors"],
    "stepjax.config": ["stepjax.data"],
    "stepjax.protocols": ["stepjax.config"],
    "experiments": ["stepjax.protocols"],
    "stepjax.train": ["stepjax.models", "stepjax.config", "stepjax.parallel", "stepjax.records"],
    "stepjax": ["stepjax.models"],  # the package's public API (stepjax/__init__.py)
    # readers of trained models and runs
    "stepjax.evaluate": ["stepjax.train"],
    "stepjax.analysis": ["stepjax.train", "stepjax.records", "stepjax.figures"],
    "stepjax.results": ["stepjax.evaluate", "stepjax.records", "stepjax.figures"],
    "stepjax.docs": ["stepjax.results", "stepjax.analysis"],  # every run-derived document, from records
    "stepjax.main": ["stepjax.analysis", "stepjax.records"],  # resolves an NSI-guided placement
    "stepjax.study": ["stepjax.main", "stepjax.results"],
    "stepjax.campaign": ["stepjax.main"],  # the GPU campaign: trains, analyses and files records
    "benchmarks": ["stepjax.train"],
    "stepjax.odebench": ["stepjax.controllers", "stepjax.records", "stepjax.figures"],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every Python module of the repository's code, by dotted name."""
    return {module_name(p): p for source in SOURCES for p in sorted((ROOT / source).rglob("*.py"))}


def imports(name: str, path: Path, known) -> list[tuple[str, str]]:
    """``(imported module, imported name or '')`` for each import of the module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, "") if submodule in known else (base, alias.name))
    return [(target, what) for target, what in found if target.split(".")[0] in SOURCES]


def unit(name: str) -> str:
    """The entry of `LAYERS` a module belongs to: the longest one that contains it."""
    owners = [u for u in LAYERS if name == u or name.startswith(u + ".")]
    if not owners:
        raise AssertionError(f"{name} belongs to no entry of LAYERS: add its package there, below what it imports.")
    return max(owners, key=len)


def below(layers: dict) -> dict[str, set]:
    """Each entry's transitive lower entries; fails on a cycle in `layers` itself."""
    closed = {}

    def visit(u, path):
        if u in path:
            raise AssertionError(f"LAYERS has a cycle: {' -> '.join([*path, u])}")
        if u not in closed:
            closed[u] = set().union(*[{d} | visit(d, [*path, u]) for d in layers[u]])
        return closed[u]

    for u in layers:
        visit(u, [])
    return closed


def graph(mods: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    return {name: imports(name, path, mods) for name, path in mods.items()}


def upward_imports(edges, layers) -> list[str]:
    """Imports of a module from an entry that is not below its own, and private names imported from
    another entry."""
    allowed = below(layers)
    bad = []
    for source, targets in edges.items():
        for target, what in targets:
            a, b = unit(source), unit(target)
            if a != b and b not in allowed[a]:
                bad.append(f"{source} imports {target} ({b} is not below {a})")
            if a != b and what.startswith("_"):
                bad.append(f"{source} imports the private name {what} from {target}")
    return bad


def cycles(edges) -> list[list[str]]:
    """The import cycles between modules (one path each), by depth-first search."""
    state, found = {}, []

    def visit(node, path):
        state[node] = "open"
        for target in dict.fromkeys(t for t, _ in edges.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])
    return found


def test_imports_point_down_the_layers():
    assert upward_imports(graph(modules()), LAYERS) == []


def test_no_import_cycle():
    assert cycles(graph(modules())) == []


def test_every_module_has_a_layer_and_the_layers_no_cycle():
    assert {unit(name) for name in modules()} <= set(LAYERS)
    assert below(LAYERS)["stepjax.main"] >= {"stepjax.train", "stepjax.models", "stepjax.ode"}


# public names that start with an underscore: the namedtuple API, and os._exit
NAMEDTUPLE_API = {"_asdict", "_replace", "_fields", "_make", "_exit"}


def private_attributes(path: Path, root: Path = ROOT) -> list[str]:
    """Uses of a private attribute of anything but ``self`` or ``cls`` (``stage._slice``)."""
    return [f"{path.relative_to(root)}:{node.lineno} .{node.attr}"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and node.attr not in NAMEDTUPLE_API
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


def test_no_private_attribute_of_another_object():
    assert [use for path in modules().values() for use in private_attributes(path)] == []


def test_the_checks_catch_an_upward_import_a_private_name_and_a_cycle(tmp_path):
    edges = {
        "stepjax.controllers.attention": [("stepjax.models.layers", "")],
        "stepjax.models.resnet": [("stepjax.ode.euler", "_save_policy")],
        "stepjax.train.loop": [("stepjax.analysis.placement", "")],
        "stepjax.analysis.placement": [("stepjax.analysis.report", "")],
        "stepjax.analysis.report": [("stepjax.train.loop", "")],
    }
    assert upward_imports(edges, LAYERS) == [
        "stepjax.controllers.attention imports stepjax.models.layers (stepjax.models is not below stepjax.controllers)",
        "stepjax.models.resnet imports the private name _save_policy from stepjax.ode.euler",
        "stepjax.train.loop imports stepjax.analysis.placement (stepjax.analysis is not below stepjax.train)",
    ]
    assert cycles(edges) == [["stepjax.train.loop", "stepjax.analysis.placement", "stepjax.analysis.report",
                              "stepjax.train.loop"]]
    with pytest.raises(AssertionError, match="LAYERS has a cycle: a -> b -> a"):
        below({"a": ["b"], "b": ["a"]})
    # how the stiffness analysis once took a stage apart
    source = "def blocks(stage):\n    return [stage._slice(k) for k in range(2)] + [stage.state._asdict()]\n"
    (tmp_path / "walker.py").write_text(source)
    assert private_attributes(tmp_path / "walker.py", tmp_path) == ["walker.py:2 ._slice"]
