"""The package keeps the rules of docs/architecture.md: its stages are
subpackages and no stage imports a later one; no function over 60 lines, no
class over 200 (docstrings not counted), no module over 400 non-blank lines;
``__init__`` re-exports the public API and nothing else."""
import ast
import doctest
import importlib
import pathlib
import re

import pytest

import jlocalmap as jlm

PACKAGE = pathlib.Path(jlm.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
# The floors of the package, bottom first: a module may import its own floor and
# the floors below (docs/architecture.md draws them). The base modules, the value
# libraries, movement, the two stages of a call, then what reads finished
# programs and the public callable; collectives stand beside movement (they
# need layouts only); strategies choose among local_map callables; estimates
# price whole programs (and let strategies choose for their target); the testing
# kit, which the package does not import, uses the public API.
FLOORS = [{"errors", "_jax_compat", "_deprecation", "_caches"}, {"layouts"}, {"movement", "collectives"}, {"call"},
          {"region"}, {"inspect"}, {"local_map"}, {"strategies"}, {"estimate"},
          {"__init__"}, {"testing"}]
LIMITS = {ast.FunctionDef: 60, ast.AsyncFunctionDef: 60, ast.ClassDef: 200}


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers taken by docstrings anywhere in ``tree``."""
    lines = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and \
                isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(source: str, tree: ast.AST, start: int, end: int) -> int:
    """Non-blank, non-docstring, non-comment lines in [start, end]."""
    skip = docstring_lines(tree)
    lines = source.splitlines()
    return sum(1 for n in range(start, end + 1)
               if n not in skip and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_size_limits(path):
    source = path.read_text()
    tree = ast.parse(source)
    total = sum(1 for line in source.splitlines() if line.strip())
    assert total <= 400, f"{path.name}: {total} non-blank lines (limit 400)"
    for node in ast.walk(tree):
        limit = LIMITS.get(type(node))
        if limit is not None:
            size = code_lines(source, tree, node.lineno, node.end_lineno)
            assert size <= limit, f"{path.name}:{node.lineno} {node.name}: {size} lines (limit {limit})"


def part_of(module: str) -> str:
    """The top-level part of jlocalmap a module path (``a.b.c``) belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(part: str) -> int:
    matches = [i for i, floor in enumerate(FLOORS) if part in floor]
    assert matches, f"jlocalmap/{part} is on no floor: add it to FLOORS (and docs/architecture.md)"
    return matches[0]


def imported_parts(path: pathlib.Path) -> set[str]:
    """The parts of jlocalmap a module imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "jlocalmap":
            found.add(part_of(node.module) if node.module != "jlocalmap" else "__init__")
        elif isinstance(node, ast.Import):
            found.update(part_of(a.name) if a.name != "jlocalmap" else "__init__"
                         for a in node.names if a.name.split(".")[0] == "jlocalmap")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_stage_imports_a_later_stage(path):
    rel = path.relative_to(PACKAGE).with_suffix("")
    own = rel.parts[0] if len(rel.parts) > 1 else rel.name
    later = {part for part in imported_parts(path)
             if floor_of(part) > floor_of(own) or (floor_of(part) == floor_of(own) and part != own)}
    assert not later, f"jlocalmap/{rel}.py ({own}) imports {sorted(later)}, on a later floor"


def test_the_stages_are_folders():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "_caches.py", "_deprecation.py", "_jax_compat.py",
                    "errors.py", "local_map.py"], flat


def test_init_reexports_the_public_api_only():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        assert isinstance(node, (ast.ImportFrom, ast.Assign, ast.Expr)), ast.dump(node)[:80]
    exported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert {name for name in exported if not name.startswith("_")} == set(jlm.__all__)


def test_namespaces_export_what_they_define():
    """jlocalmap.inspect and jlocalmap.strategies re-export their API and nothing else."""
    for namespace in (jlm.inspect, jlm.strategies):
        tree = ast.parse(pathlib.Path(namespace.__file__).read_text())
        exported = {alias.asname or alias.name for node in tree.body
                    if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert exported == set(namespace.__all__), namespace.__name__


@pytest.mark.parametrize("old", sorted(jlm._MOVED))
def test_moved_names_work_for_a_release_with_a_warning(old):
    """Every name that left the top level still works, warns, and names its new spelling."""
    new = jlm._MOVED[old]
    with pytest.warns(DeprecationWarning, match=rf"jlocalmap\.{old} is deprecated: use {new}\b"):
        found = getattr(jlm, old)
    where, _, name = new.rpartition(".")
    assert found is getattr(importlib.import_module(where), name)
    assert old not in jlm.__all__


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        jlm.no_such_name  # noqa: B018


def attribute_docstrings(path: pathlib.Path) -> dict[str, str]:
    """The docstrings of a module's module-level assignments (the string right after
    ``Name = ...``), as mkdocstrings reads them: a type alias keeps its doc there."""
    body = ast.parse(path.read_text()).body   # pairs of neighbours: the last has none
    return {node.targets[0].id: after.value.value for node, after in zip(body, body[1:], strict=False)
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)}


TYPE_ALIASES = attribute_docstrings(PACKAGE / "layouts" / "placements.py")


@pytest.mark.parametrize("name", jlm.__all__)
def test_every_public_name_has_a_docstring_with_an_example(name):
    obj = getattr(jlm, name)
    doc = TYPE_ALIASES[name] if name in TYPE_ALIASES else obj.__doc__ or ""
    assert ">>>" in doc, f"jlocalmap.{name} has no runnable example in its docstring"


@pytest.mark.parametrize("name", sorted(TYPE_ALIASES))
def test_type_alias_examples_run(name):
    """--doctest-modules runs objects' docstrings; an alias's is the module's text."""
    test = doctest.DocTestParser().get_doctest(TYPE_ALIASES[name], {}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_one_leaf_walks_each_stage_once_and_is_read_once():
    """benchmarks/leaf_walk.py: an input on another mesh goes call > region, and
    its mesh and layout are read once (docs/architecture.md has the table)."""
    from benchmarks.leaf_walk import summary, walk_other_mesh_leaf
    stays, reads = walk_other_mesh_leaf()
    found = summary(stays)
    assert (found["stage walk"], found["stage comebacks"]) == ("call > region", 0), found
    assert reads == {"mesh_of": 1, "layout_of": 1}, reads


PUBLIC_MODULES = {"jlocalmap", "jlocalmap.collectives", "jlocalmap.inspect", "jlocalmap.strategies",
                  "jlocalmap.testing"}
_DOCTEST_IMPORT = re.compile(r"^\s*(?:>>>|\.\.\.)\s+(?:from\s+(jlocalmap[\w.]*)\s+import|import\s+(jlocalmap[\w.]*))",
                             re.MULTILINE)


def doctest_imports(path: pathlib.Path) -> set[str]:
    return {a or b for a, b in _DOCTEST_IMPORT.findall(path.read_text())}


@pytest.mark.parametrize("path", MODULES + sorted((PACKAGE.parent / "docs").glob("*.md"))
                         + [PACKAGE.parent / "README.md"], ids=str)
def test_doctests_import_public_names_only(path):
    """Examples import the public API; an implementation module's own doctests may
    also import that module, whose names they document (docs/architecture.md)."""
    own = ".".join(("jlocalmap",) + path.relative_to(PACKAGE).with_suffix("").parts) \
        if path.is_relative_to(PACKAGE) else None
    internal = {m for m in doctest_imports(path) if m not in PUBLIC_MODULES and m != own}
    assert not internal, f"{path.name}: doctests import internals {sorted(internal)}"
