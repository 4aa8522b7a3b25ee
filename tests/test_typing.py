"""One annotation style in every module of ``src/trainenv``, and ``mypy --strict`` clean.

The style (README, "Layout of this repository"): ``from __future__ import annotations`` first; builtin
generics and ``X | None`` (never ``Optional``/``Dict``/``List``/...); names needed only for
annotations imported from ``typing`` inside ``if TYPE_CHECKING:``, where ``TYPE_CHECKING = False``
(importing ``typing`` costs milliseconds at start-up); nothing annotation-only in a run-time
expression, which must still work on Python 3.9. One test case per module, so a failure names it.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "trainenv"
MODULES = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
OLD_NAMES = {"Optional", "Union", "Dict", "List", "Tuple", "Set", "FrozenSet", "Type", "DefaultDict", "Deque"}
# Names that are types at run time: ``str | None`` or ``dict[str, int] | None`` outside an
# annotation raises TypeError on Python 3.9.
TYPE_NAMES = {"str", "int", "float", "bool", "bytes", "object", "dict", "list", "tuple", "set", "frozenset", "type"}


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _typeish(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    if isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Name) and node.id in TYPE_NAMES


class _Checker(ast.NodeVisitor):
    """Collects style problems; annotations and ``if TYPE_CHECKING:`` bodies are type-checker only."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking_block(node):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module == "typing":
                    old = sorted({alias.name for alias in inner.names} & OLD_NAMES)
                    if old:
                        self.problems.append(f"line {inner.lineno}: imports {', '.join(old)} (use builtin generics and X | None)")
            for inner in node.orelse:
                self.visit(inner)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        if any(alias.name == "typing" for alias in node.names):
            self.problems.append(f"line {node.lineno}: imports typing at run time")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "typing":
            self.problems.append(f"line {node.lineno}: imports from typing at run time (use an if TYPE_CHECKING: block)")

    def _annotation(self, annotation: ast.expr | None) -> None:
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            self.problems.append(f"line {annotation.lineno}: quoted annotation {annotation.value!r} (annotations are lazy already)")

    def visit_arguments(self, node: ast.arguments) -> None:
        for arg in [*node.posonlyargs, *node.args, *node.kwonlyargs, node.vararg, node.kwarg]:
            if arg is not None:
                self._annotation(arg.annotation)
        for default in [*node.defaults, *node.kw_defaults]:
            if default is not None:
                self.visit(default)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._annotation(node.returns)
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit(node.args)
        for statement in node.body:
            self.visit(statement)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._annotation(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.BitOr) and (_typeish(node.left) or _typeish(node.right)):
            self.problems.append(f"line {node.lineno}: a type union outside an annotation fails on Python 3.9")
        self.generic_visit(node)


def style_problems(source: str) -> list[str]:
    """What breaks the annotation style in one module's ``source``."""
    tree = ast.parse(source)
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the module docstring
    problems = []
    first = body[0] if body else None
    if not (
        isinstance(first, ast.ImportFrom)
        and first.module == "__future__"
        and any(alias.name == "annotations" for alias in first.names)
    ):
        problems.append("does not start with `from __future__ import annotations`")
    for node in body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TYPE_CHECKING" for t in node.targets):
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                problems.append(f"line {node.lineno}: TYPE_CHECKING must be the constant False")
    checker = _Checker()
    checker.visit(tree)
    return problems + checker.problems


def test_the_checker_finds_each_problem():
    bad = (
        '"""Doc."""\n'
        "import os\n"
        "from typing import Optional\n"
        "TYPE_CHECKING = False\n"
        "if TYPE_CHECKING:\n"
        "    from typing import Dict\n"
        "Alias = dict[str, int] | None\n"
        'def f(x: "Thing") -> Optional[int]:\n'
        "    return isinstance(x, str | bytes)\n"
    )
    found = "\n".join(style_problems(bad))
    for fragment in ("__future__", "line 3: imports from typing at run time", "line 6: imports Dict", "line 7: a type union", "quoted annotation 'Thing'", "line 9: a type union"):
        assert fragment in found, found
    good = (
        '"""Doc."""\n'
        "from __future__ import annotations\n"
        "TYPE_CHECKING = False\n"
        "if TYPE_CHECKING:\n"
        "    from typing import Any\n"
        "    Alias = dict[str, Any] | None\n"
        "FLAGS = 1 | 2\n"
        "def f(x: str | None = None) -> dict[str, Any] | None:\n"
        "    y: list[int] | None = None\n"
        "    return None\n"
    )
    assert style_problems(good) == []


@pytest.mark.parametrize("module", MODULES)
def test_module_follows_the_annotation_style(module):
    assert style_problems((PACKAGE / module).read_text(encoding="utf-8")) == []


@pytest.fixture(scope="module")
def mypy_report() -> str:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    # The [tool.mypy] section of pyproject.toml: strict, over src/trainenv.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    return result.stdout


@pytest.mark.parametrize("module", MODULES)
def test_module_is_mypy_strict_clean(mypy_report, module):
    path = f"src/trainenv/{module}"
    errors = [line for line in mypy_report.splitlines() if re.match(rf"{re.escape(path)}:\d+: error:", line)]
    assert errors == []
