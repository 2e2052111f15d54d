"""Programmatic, reproducible paraphrases of a Python function at three distances.

* :func:`rename`: every name the function binds (its own name, parameters except ``self``/``cls``,
  assigned and loop/with/except targets, comprehension variables, local imports; dunder names
  kept) is replaced,
  consistently, by a generic word drawn with a seeded RNG. Done on the token stream
  (:mod:`tokenize`), so layout and comments stay; attribute names (after ``.``) and keyword
  arguments in calls (``f(x=1)``) are left alone.
* :func:`restructure`: on the syntax tree (:mod:`ast`): docstrings dropped, comments and layout
  lost by ``ast.unparse`` (which also normalizes quotes and spacing), ``if c: A else: B`` turned
  into ``if not c: B else: A``, ``x += y`` into ``x = x + y``, and adjacent simple statements
  swapped where that is legal (neither reads or writes a name the other writes, and neither
  calls, yields or awaits anything). The renaming is then applied to the result.
* :func:`find_functions`: candidate functions of a module with their byte offsets.
"""

from __future__ import annotations

import ast
import builtins
import io
import keyword
import random
import textwrap
import tokenize
from dataclasses import dataclass

WORDS = (
    "item", "value", "entry", "node", "elem", "thing", "obj", "data", "arg", "param", "tmp",
    "res", "out", "acc", "cur", "key2", "part", "piece", "unit", "token", "field", "slot", "cell",
    "record", "chunk", "blob", "handle", "target", "source", "holder", "marker", "bucket",
)
KEEP = {"self", "cls"} | set(dir(builtins)) | set(keyword.kwlist)


@dataclass(frozen=True)
class Function:
    """A function (or method) of a module: its exact bytes and where they start."""

    name: str
    path: str
    start: int  # byte offset of the start of the ``def`` line (including its indentation)
    text: str  # the exact source, from the start of the ``def`` line to the end of its last line
    lineno: int
    statements: int  # top-level statements of the body, docstring excluded


def find_functions(source: bytes, path: str) -> list[Function]:
    """Undecorated ``def`` statements (any nesting) with their exact text and byte offset."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.decorator_list:
            continue
        start = offsets[node.lineno - 1]
        end = offsets[node.end_lineno]
        raw = source[start:end]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        body = node.body[1:] if _docstring(node.body) else node.body
        out.append(Function(node.name, path, start, text.rstrip("\n"), node.lineno, len(body)))
    return sorted(out, key=lambda f: f.start)


def _docstring(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str)


def _split_indent(text: str) -> tuple[str, str]:
    """``(indent, dedented text)`` of a function's source (a method is indented)."""
    first = text.splitlines()[0]
    indent = first[: len(first) - len(first.lstrip())]
    return indent, textwrap.dedent(text)


def has_fstring(text: str) -> bool:
    """f-strings hide names from :mod:`tokenize` (Python < 3.12): such functions are skipped."""
    return any(isinstance(n, ast.JoinedStr) for n in ast.walk(ast.parse(textwrap.dedent(text))))


def bound_names(text: str) -> list[str]:
    """Names the function binds, in order of first appearance (``self``/``cls``/builtins excluded)."""
    _, code = _split_indent(text)
    tree = ast.parse(code)
    fn = tree.body[0]
    names: list[str] = [fn.name]
    for node in ast.walk(fn):
        if isinstance(node, ast.arg):
            names.append(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.extend((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef) and node is not fn:
            names.append(node.name)
    seen: list[str] = []
    for n in names:
        if n not in seen and n not in KEEP and not (n.startswith("__") and n.endswith("__")):
            seen.append(n)
    return seen


def rename_map(text: str, seed: int) -> dict[str, str]:
    """A consistent old -> new mapping for :func:`bound_names`, new names not already used."""
    names = bound_names(text)
    used = {t.string for t in tokenize.generate_tokens(io.StringIO(textwrap.dedent(text)).readline) if t.type == tokenize.NAME}
    rng = random.Random(seed)
    pool = [w for w in WORDS if w not in used]
    rng.shuffle(pool)
    mapping = {}
    for i, n in enumerate(names):
        mapping[n] = pool[i] if i < len(pool) else f"v{i}"
    return mapping


def rename(text: str, mapping: dict[str, str]) -> str:
    """Apply ``mapping`` to NAME tokens that are not attributes nor keyword-argument names."""
    indent, code = _split_indent(text)
    toks = list(tokenize.generate_tokens(io.StringIO(code + "\n").readline))
    out = []
    depth = 0
    for i, t in enumerate(toks):
        s = t.string
        if t.type == tokenize.OP and s in "([{":
            depth += 1
        elif t.type == tokenize.OP and s in ")]}":
            depth -= 1
        if t.type == tokenize.NAME and s in mapping:
            prev = _prev_significant(toks, i)
            nxt = _next_significant(toks, i)
            is_attr = prev is not None and prev.string == "."
            is_kwarg = depth > 0 and nxt is not None and nxt.string == "=" and not _in_def_header(toks, i)
            if not is_attr and not is_kwarg:
                t = t._replace(string=mapping[s])
        out.append(t)
    result = tokenize.untokenize(out).rstrip("\n")
    ast.parse(result)  # must still be valid Python
    return textwrap.indent(result, indent) if indent else result


def _prev_significant(toks: list[tokenize.TokenInfo], i: int) -> tokenize.TokenInfo | None:
    for t in reversed(toks[:i]):
        if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            return t
    return None


def _next_significant(toks: list[tokenize.TokenInfo], i: int) -> tokenize.TokenInfo | None:
    for t in toks[i + 1 :]:
        if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            return t
    return None


def _in_def_header(toks: list[tokenize.TokenInfo], i: int) -> bool:
    """True inside the parameter list of a ``def`` (defaults ``x=1`` rename the parameter)."""
    depth = 0
    for t in reversed(toks[:i]):
        if t.type == tokenize.OP and t.string in ")]}":
            depth += 1
        elif t.type == tokenize.OP and t.string in "([{":
            if depth == 0:
                j = toks.index(t)
                return j >= 2 and toks[j - 2].string == "def"
            depth -= 1
        elif t.type in (tokenize.NEWLINE,):
            return False
    return False


# ---------------------------------------------------------------------- restructuring
class _Restructure(ast.NodeTransformer):
    def __init__(self) -> None:
        self.changes: list[str] = []

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        if _docstring(body) and len(body) > 1:
            body = body[1:]
            self.changes.append("docstring dropped")
        body = [self.visit(s) for s in body]
        return self._reorder(body)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.body = self._body(node.body)
        return node

    def visit_If(self, node: ast.If) -> ast.If:
        node.body = self._body(node.body)
        node.orelse = [self.visit(s) for s in node.orelse]
        if node.orelse:
            test = node.test.operand if isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not) else ast.UnaryOp(ast.Not(), node.test)
            node.test, node.body, node.orelse = test, node.orelse, node.body
            self.changes.append("if/else inverted")
        return node

    def visit_For(self, node: ast.For) -> ast.For:
        node.body = self._body(node.body)
        return node

    visit_While = visit_For  # type: ignore[assignment]
    visit_With = visit_For  # type: ignore[assignment]

    def visit_Try(self, node: ast.Try) -> ast.Try:
        node.body = self._body(node.body)
        for h in node.handlers:
            h.body = self._body(h.body)
        node.finalbody = [self.visit(s) for s in node.finalbody]
        node.orelse = [self.visit(s) for s in node.orelse]
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.stmt:
        if isinstance(node.target, (ast.Name, ast.Attribute)):
            load = _as_load(node.target)
            self.changes.append("x += y expanded")
            return ast.Assign(targets=[node.target], value=ast.BinOp(load, node.op, node.value), lineno=node.lineno)
        return node

    def _reorder(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out = list(body)
        i = 0
        while i + 1 < len(out):
            a, b = out[i], out[i + 1]
            if _independent(a, b):
                out[i], out[i + 1] = b, a
                self.changes.append("statements swapped")
                i += 2
            else:
                i += 1
        return out


def _as_load(target: ast.expr) -> ast.expr:
    node = ast.parse(ast.unparse(target), mode="eval").body
    return node


_SIMPLE = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr, ast.Import, ast.ImportFrom)


def _names(node: ast.AST) -> tuple[set[str], set[str], bool]:
    """``(written, read, calls)`` for a simple statement; attributes count as their full dotted name."""
    written, read = set(), set()
    calls = False
    for n in ast.walk(node):
        if isinstance(n, (ast.Call, ast.Yield, ast.YieldFrom, ast.Await)):
            calls = True
        if isinstance(n, ast.Name):
            (written if isinstance(n.ctx, ast.Store) else read).add(n.id)
        elif isinstance(n, ast.Attribute):
            dotted = ast.unparse(n)
            (written if isinstance(n.ctx, ast.Store) else read).add(dotted)
            root = n
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name):
                read.add(root.id)
                if isinstance(n.ctx, ast.Store):
                    written.add(root.id + ".*")
        elif isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store):
            written.add(ast.unparse(n.value))
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            written.update((a.asname or a.name).split(".")[0] for a in n.names)
    return written, read, calls


def _independent(a: ast.stmt, b: ast.stmt) -> bool:
    if not (isinstance(a, _SIMPLE) and isinstance(b, _SIMPLE)):
        return False
    wa, ra, ca = _names(a)
    wb, rb, cb = _names(b)
    if ca or cb:  # a call may read or write anything (e.g. through self)
        return False

    def clash(w: set[str], other: set[str]) -> bool:
        for x in w:
            for y in other:
                if x == y or y.startswith(x + ".") or x.startswith(y + ".") or (x.endswith(".*") and y.startswith(x[:-2])):
                    return True
        return False

    return not (clash(wa, rb | wb) or clash(wb, ra | wa))


def restructure(text: str, mapping: dict[str, str]) -> tuple[str, list[str]]:
    """Restructured then renamed source, and the list of changes made (see module docstring)."""
    indent, code = _split_indent(text)
    tree = ast.parse(code)
    tr = _Restructure()
    tree = ast.fix_missing_locations(tr.visit(tree))
    if any(t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(code).readline)):
        tr.changes.append("comments dropped")
    result = ast.unparse(tree)
    result = rename(result, mapping)
    return (textwrap.indent(result, indent) if indent else result), sorted(set(tr.changes))
