"""The package keeps the size limits of docs/architecture.md: no function over
60 lines, no class over 200 (docstrings not counted), no module over 400
non-blank lines, and
``__init__`` re-exports the public API and nothing else."""
import ast
import pathlib

import pytest

import jlocalmap as jlm

PACKAGE = pathlib.Path(jlm.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))
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


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
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


def test_init_reexports_the_public_api_only():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        assert isinstance(node, (ast.ImportFrom, ast.Assign, ast.Expr)), ast.dump(node)[:80]
    exported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert exported == set(jlm.__all__)


@pytest.mark.parametrize("name", jlm.__all__)
def test_every_public_name_has_a_docstring_with_an_example(name):
    obj = getattr(jlm, name)
    doc = obj.__doc__ or ""
    assert ">>>" in doc, f"jlocalmap.{name} has no runnable example in its docstring"
