"""The folder layout is the architecture: imports point down the layers, and no module imports itself back.

Every ``import`` of the project's own modules is read from the source (function-level
imports included), so a lazy import cannot hide an upward dependency or a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# lower layers never import higher ones; packages in one layer never import each other
LAYERS = {
    "pipeline.errors": -1,  # UserError / DataError: raised in every layer, mapped to exit 2 by the CLIs
    "pipeline.crops": -1,  # the training crop's geometry: the shards' training copies and training share it
    "pipeline.files": -1,  # atomic writes and JSON files: shards, commit records, checkpoints, recipes
    "pipeline.shards": 0,  # shard format, storage, commit records, shard reading
    "pipeline.common": 1,  # images, variants, devices, shared flags, logging: used by both halves
    # the model families: everything model-specific behind one interface; both halves import it, it neither
    "pipeline.families": 1.5,
    "pipeline.extract": 2,
    # the training half, bottom up: its typed options, the recipe files, the data stream, the engine, the CLI
    "pipeline.train.config": 2,
    "pipeline.train.recipe": 2.1,
    "pipeline.train.stream": 2.2,
    "pipeline.train.engine": 2.3,
    "pipeline.train": 2.4,
    "pipeline.kit": 3,
    "pipeline.demo": 4,
    "shards_tools": 4,
    "benchmarks": 5,  # scripts over everything; nothing imports them
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [
        *(f for package in ("pipeline", "shards_tools", "benchmarks") for f in ROOT.joinpath(package).rglob("*.py"))
    ]
    return {module_name(f): f for f in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports (``from pkg import mod`` resolves to the module when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def package_of(module: str) -> str:
    return next(p for p in sorted(LAYERS, key=len, reverse=True) if module == p or module.startswith(p + "."))


def test_every_module_belongs_to_a_layer():
    assert {
        m for m in project_modules() if m != "pipeline" and not any(m == p or m.startswith(p + ".") for p in LAYERS)
    } == set()


def test_imports_point_down_the_layers():
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        if name == "pipeline":
            continue
        here = package_of(name)
        for target in imports_of(path, modules):
            if target == "pipeline":
                continue
            there = package_of(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_checker_sees_lazy_imports(tmp_path):
    """The import reader must catch imports inside functions (where cycles used to hide)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from pipeline.train.engine import trainer\n    import pipeline.shards.storage\n")
    assert imports_of(source, project_modules()) == {"pipeline.train.engine.trainer", "pipeline.shards.storage"}


# ---- the rooms' own rules: every module keeps to its own state, the dataset has no mode branch, functions stay short


def project_sources() -> dict[str, Path]:
    """The modules of pipeline/ and shards_tools/ (the code the rules hold for; benchmarks are scripts)."""
    return {name: path for name, path in project_modules().items() if not name.startswith("benchmarks")}


# private names of other libraries' objects that their own documentation tells callers to use
FOREIGN_PRIVATE_CALLS = {"os._exit", "fs._strip_protocol"}


def foreign_private_uses(tree: ast.AST) -> list[str]:
    """Writes to another object's private field (``x._f = …``, ``x._f += …``) and calls of another object's private
    method (``x._m()``); ``self``/``cls``/``super()`` are the object's own."""

    def own(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in ("self", "cls")) or (
            isinstance(node, ast.Call) and getattr(node.func, "id", None) == "super"
        )

    def private(attr: str) -> bool:
        return attr.startswith("_") and not attr.startswith("__")

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets = [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else targets
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and private(sub.attr) and not own(sub.value):
                    found.append(f"line {node.lineno}: writes {ast.unparse(sub)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and private(node.func.attr):
            name = ast.unparse(node.func)
            if not own(node.func.value) and name not in FOREIGN_PRIVATE_CALLS:
                found.append(f"line {node.lineno}: calls {name}")
    return found


def test_no_module_writes_or_calls_another_objects_private_members():
    """Each object's private state is its own: the stream's state module used to write the dataset's fields and
    call its ``_stream()``; state now flows through public methods and pure functions."""
    wrong = {
        name: uses
        for name, path in project_sources().items()
        if (uses := foreign_private_uses(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert wrong == {}


def test_the_private_member_check_can_fail():
    tree = ast.parse("def f(d, s):\n    d._made = 1\n    d.base._x += 2\n    s._stream('t', 1)\n    self._ok = 3\n")
    assert [u.split(": ", 1)[1] for u in foreign_private_uses(tree)] == [
        "writes d._made", "writes d.base._x", "calls s._stream",
    ]  # fmt: skip


def kind_branches(tree: ast.AST) -> list[str]:
    """Conditions that test an ``indexed`` attribute (the stream's kind): a mode branch the strategies replace."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.IfExp | ast.While | ast.Assert):
            test = node.test
            if any(isinstance(sub, ast.Attribute) and sub.attr == "indexed" for sub in ast.walk(test)):
                found.append(f"line {node.lineno}: {ast.unparse(test)}")
    return found


def test_the_dataset_does_not_branch_on_the_kind_of_shards():
    """Indexed and streamed shards are two source strategies (``stream/sources.py``); the partition stream and the
    dataset compose one of them and never ask which (they branched 11 times on ``self.indexed``)."""
    path = ROOT / "pipeline" / "train" / "stream" / "dataset.py"
    assert kind_branches(ast.parse(path.read_text(encoding="utf-8"))) == []
    assert kind_branches(ast.parse("if self.indexed:\n    pass\nx = a if s.source.indexed else b\n")) != []


MAX_FUNCTION_LINES = 60
WHY_LONG = "Why one function:"  # a longer function says, in its docstring, why it is not split


def long_functions(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and WHY_LONG not in (ast.get_docstring(node) or ""):
                found.append(f"{node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_a_screen_without_saying_why():
    wrong = {
        name: found
        for name, path in project_sources().items()
        if (found := long_functions(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert wrong == {}
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(ast.parse(f"def f():\n{body}\n")) == [f"f ({MAX_FUNCTION_LINES + 1} lines)"]


# ---- every module has its specification among the unit tests


def has_code(path: Path) -> bool:
    """Whether a module holds more than a docstring and imports (a package's ``__init__`` often does not)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not isinstance(n, ast.Import | ast.ImportFrom) and not (isinstance(n, ast.Expr) and isinstance(
        n.value, ast.Constant)) for n in body)  # fmt: skip


def declared_specs(path: Path) -> tuple[str, ...]:
    """A unit test file's ``SPECIFIES = (...)``: the modules it is the specification of besides its namesake."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SPECIFIES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()


def test_every_module_has_a_unit_test_file_that_names_it_and_imports_it():
    """``tests/unit/test_<module>.py``, or a unit test file that lists the module in its ``SPECIFIES``; either way
    the file imports the module it specifies (a name alone specifies nothing)."""
    modules = project_modules()
    unit = sorted((ROOT / "tests" / "unit").glob("test_*.py"))
    specifiers: dict[str, list[Path]] = {}
    for test in unit:
        for module in declared_specs(test):
            assert module in modules, f"{test.name} specifies {module}, which does not exist"
            specifiers.setdefault(module, []).append(test)
    missing = []
    for name, path in sorted(modules.items()):
        if not name.startswith("pipeline") or name.endswith("__main__") or not has_code(path):
            continue
        candidates = [t for t in unit if t.stem == f"test_{name.rsplit('.', 1)[-1]}"] + specifiers.get(name, [])
        if not any(name in imports_of(t, modules) for t in candidates):
            missing.append(name)
    assert missing == []
