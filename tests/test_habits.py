"""House habits (STYLE.md, issue 10): public functions carry type hints, no function runs past 80 lines,
and a module past 400 lines says in its docstring why it is one piece."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def _public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """(qualified name, node, is_method) of module-level functions and of methods in module-level (and
    nested) classes whose names have no leading underscore; closures inside functions are not visited."""
    found = []

    def visit(body: list[ast.stmt], prefix: str, in_class: bool) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                found.append((prefix + node.name, node, in_class))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.", True)

    visit(tree.body, "", False)
    return found


def missing_annotations(source: str) -> list[str]:
    """'name: what' for every public function or method lacking a parameter or return annotation."""
    bad = []
    for name, fn, is_method in _public_functions(ast.parse(source)):
        a = fn.args
        params = a.posonlyargs + a.args
        static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
        if is_method and not static and params and params[0].arg in ("self", "cls"):
            params = params[1:]
        params = params + a.kwonlyargs + [v for v in (a.vararg, a.kwarg) if v is not None]
        missing = [p.arg for p in params if p.annotation is None]
        if fn.returns is None:
            missing.append("return")
        if missing:
            bad.append(f"{name}:{fn.lineno}: no annotation for {', '.join(missing)}")
    return bad


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (methods and closures included) longer than `limit` lines, from `def` to its end."""
    return [
        f"{node.name}:{node.lineno}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
    ]


def unexplained_length(source: str, limit: int = MAX_MODULE_LINES) -> str | None:
    """Why a module is too long without saying why (its docstring must mention its `lines`), or None."""
    n = len(source.splitlines())
    if n <= limit:
        return None
    doc = ast.get_docstring(ast.parse(source)) or ""
    if "lines" in doc:
        return None
    return f"{n} lines and the module docstring does not say why (split it, or explain in the docstring)"


def _package_sources() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, "jsft")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    out[os.path.relpath(path, REPO)] = f.read()
    return out


def test_public_functions_have_type_hints():
    bad = [
        f"{path}: {b}" for path, src in sorted(_package_sources().items()) for b in missing_annotations(src)
    ]
    assert bad == []


def test_no_function_is_longer_than_80_lines():
    bad = [f"{path}: {b}" for path, src in sorted(_package_sources().items()) for b in long_functions(src)]
    assert bad == []


def test_long_modules_say_why():
    bad = [
        f"{path}: {why}"
        for path, src in sorted(_package_sources().items())
        if (why := unexplained_length(src))
    ]
    assert bad == []


def test_the_annotation_check_flags_a_bare_parameter_and_a_missing_return():
    source = (
        "def f(x, y: int) -> int:\n    return y\n"
        "def g(x: int):\n    def inner(z):\n        return z\n    return inner\n"
        "def _private(x):\n    return x\n"
        "class C:\n"
        "    def m(self, a) -> None: ...\n"
        "    @classmethod\n    def make(cls, *args: int, **kw) -> 'C': ...\n"
        "    @staticmethod\n    def s(self: int) -> int: ...\n"
        "    def __init__(self, a): ...\n"
    )
    assert missing_annotations(source) == [
        "f:1: no annotation for x",
        "g:3: no annotation for return",
        "C.m:10: no annotation for a",
        "C.make:12: no annotation for kw",
    ]


def test_the_length_check_flags_a_long_function_and_a_long_closure():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    short = "def ok():\n" + body
    long = "def too_long():\n" + body + "    return 0\n"
    nested = "def outer():\n    def inner():\n" + body.replace("    ", "        ") + "        return 0\n"
    assert long_functions(short) == []
    assert long_functions(long) == [f"too_long:1: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_functions(nested) == [
        f"outer:1: {MAX_FUNCTION_LINES + 2} lines",
        f"inner:2: {MAX_FUNCTION_LINES + 1} lines",
    ]


def test_the_module_check_flags_a_long_module_unless_its_docstring_says_why():
    body = "x = 0\n" * MAX_MODULE_LINES
    assert unexplained_length('"""Short."""\n' + "x = 0\n" * (MAX_MODULE_LINES - 1)) is None
    assert unexplained_length('"""One idea."""\n' + body) == (
        f"{MAX_MODULE_LINES + 1} lines and the module docstring does not say why (split it, or explain "
        "in the docstring)"
    )
    assert unexplained_length('"""One idea, hence about 400 lines."""\n' + body) is None
