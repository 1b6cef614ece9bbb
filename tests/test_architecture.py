"""DESIGN.md's architecture rules ("Layout", the arrows), checked on the sources with ``ast``.

Nothing of the package is imported, so a broken import cannot hide a violation and a lazy
import inside a function counts like a top-level one. The checkers take a root and a
package name, so the tests at the bottom prove them on synthetic trees in ``tmp_path``.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_compress"
MAX_LINES = 450
# DESIGN: "... -> quant, sparsity -> core". What each floor may import, not what it may
# not: a new top-level module is then "above" these floors without editing this list.
# `_torchao` is an optional-dependency shim that imports nothing of the package.
FLOORS = {
    "core": ("core",),
    "quant": ("core", "quant", "sparsity", "_torchao"),
    "sparsity": ("core", "quant", "sparsity", "_torchao"),
}
METHOD_FILES = ("pruning.py", "qat.py", "distillation.py", "lora.py", "export.py")


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file; a package's ``__init__.py`` is the package module."""
    paths = sorted((root / package).rglob("*.py"))
    return {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path for path in paths}


def _nearest(dotted: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is a module: ``import a.b`` runs ``a.b``, and an
    import of a module that was moved away still points at its package."""
    parts = dotted.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in known), None)


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for each import of a package module.

    ``from pkg import sub`` imports the submodule ``pkg.sub``; ``from pkg import thing``
    imports ``pkg``. The parent packages Python also runs are not edges: the root
    ``__init__`` re-exports everything and would put every module in one circle.
    """
    found = []
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in (getattr(node.test, "id", ""), getattr(node.test, "attr", "")):
            stack.extend(node.orelse)  # type-only imports never run
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if target := _nearest(alias.name, known):
                    found.append((node.lineno, target, None))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: anchor at the importing module's package
                anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.append((node.lineno, f"{base}.{alias.name}", None))
                elif target := _nearest(base, known):
                    found.append((node.lineno, target, alias.name if target == base else None))
        stack.extend(ast.iter_child_nodes(node))
    return sorted(found)


def import_graph(root: Path, package: str) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """Modules, and for each module the modules it imports with the first line that does."""
    known = modules(root, package)
    graph: dict[str, dict[str, int]] = {name: {} for name in known}
    for name, path in known.items():
        for line, target, _ in imports(name, path, known):
            graph[name].setdefault(target, line)
    return known, graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """A shortest circle ``[a, b, ..., a]`` through each module on one, without repeats:
    circles that share a module stay separate, so each can be cut where it is."""
    cycles = set()
    for start in graph:  # breadth first from each module back to itself
        prev: dict[str, str] = {}
        queue = deque([start])
        while queue and start not in prev:
            v = queue.popleft()
            for w in sorted(graph[v]):
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
        if start in prev:
            back, v = [], prev[start]
            while v != start:
                back.append(v)
                v = prev[v]
            cycle = [start, *reversed(back)]
            first = cycle.index(min(cycle))  # one rotation, so a circle is found once
            cycles.add(tuple(cycle[first:] + cycle[:first]))
    return sorted([*cycle, cycle[0]] for cycle in cycles)


def describe_cycle(chain: list[str], known: dict[str, Path], graph: dict[str, dict[str, int]], root: Path) -> str:
    links = [f"{known[a].relative_to(root)}:{graph[a][b]} imports {b}" for a, b in zip(chain, chain[1:])]
    return " -> ".join(chain) + "\n      " + "\n      ".join(links)


def long_files(root: Path, package: str) -> list[str]:
    lines = {path: len(path.read_text().splitlines()) for path in modules(root, package).values()}
    return [f"{path.relative_to(root)}: {n} lines (max {MAX_LINES})" for path, n in lines.items() if n > MAX_LINES]


def floor_violations(root: Path, package: str) -> list[str]:
    """Imports from a low floor (core, quant, sparsity) to anything the floor may not use."""
    known = modules(root, package)
    found = []
    for name, path in known.items():
        if (floor := (name.split(".") + [""])[1]) not in FLOORS:
            continue
        allowed = tuple(f"{package}.{below}" for below in FLOORS[floor])
        for line, target in sorted({(line, target) for line, target, _ in imports(name, path, known)}):
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                found.append(f"{path.relative_to(root)}:{line} {floor} imports {target}")
    return found


def private_imports(root: Path, package: str) -> list[str]:
    """``from module import _name`` across files; dunders like ``__version__`` are public.
    A private *submodule* (``_torchao``) is private to its package, which may use it."""
    known = modules(root, package)
    return [
        f"{path.relative_to(root)}:{line} imports private {name} from {target}"
        for module, path in known.items()
        for line, target, name in imports(module, path, known)
        if name and name.startswith("_") and not name.startswith("__")
    ]


def lightning_hooks() -> set[str]:
    from lightning.pytorch import Callback  # the hooks are whatever Lightning defines today

    return {n for n, v in vars(Callback).items() if inspect.isfunction(v) and not n.startswith("_")}


def _base_name(base: ast.expr) -> str:
    return getattr(base, "id", getattr(base, "attr", ""))


def callback_violations(callbacks_dir: Path, hooks: set[str], root: Path) -> list[str]:
    """Method callbacks subclass CompressionCallback, mark hooks @override, document Args/Raises."""
    base = callbacks_dir / "base.py"
    found = []  # without the base class, still list the rest: it is the work left to do
    # The base and its subclasses declared in base.py (e.g. LayerCompressionCallback).
    bases_of_methods: dict[str, bool] = {}
    if base.exists():
        for cls in (n for n in ast.parse(base.read_text()).body if isinstance(n, ast.ClassDef)):
            bases_of_methods[cls.name] = cls.name == "CompressionCallback" or any(
                bases_of_methods.get(_base_name(b)) for b in cls.bases
            )
    if not bases_of_methods.get("CompressionCallback"):
        found.append(f"{base.relative_to(root)}: no class CompressionCallback")
    for filename in METHOD_FILES:
        path = callbacks_dir / filename
        if not path.exists():
            found.append(f"{path.relative_to(root)}: missing")
            continue
        where = path.relative_to(root)
        callbacks: dict[str, bool] = {}  # local callback class -> reaches CompressionCallback
        for cls in (n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)):
            bases = [_base_name(b) for b in cls.bases]
            if not any(b.endswith("Callback") or b in callbacks for b in bases):
                continue  # a helper such as a dataclass or a per-step record
            callbacks[cls.name] = any(
                b == "CompressionCallback" or bases_of_methods.get(b) or callbacks.get(b) for b in bases
            )
            if not callbacks[cls.name]:
                found.append(f"{where}:{cls.lineno} {cls.name} subclasses {', '.join(bases)}, not CompressionCallback")
            doc = ast.get_docstring(cls) or ""
            for section in ("Args:", "Raises:"):
                if not re.search(rf"^\s*{section}\s*$", doc, re.M):
                    found.append(f"{where}:{cls.lineno} {cls.name} docstring has no {section} section")
            for fn in cls.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in hooks:
                    if "override" not in {_base_name(d) for d in fn.decorator_list}:
                        found.append(f"{where}:{fn.lineno} {cls.name}.{fn.name} overrides a Lightning hook without @override")
        if not callbacks:
            found.append(f"{where}: no callback class")
    return found


# ---- the rules on the real tree ----------------------------------------------------


def test_no_file_over_max_lines():
    assert not (bad := long_files(REPO, PACKAGE)), "files over the limit:\n" + "\n".join(bad)


def test_no_import_circles():
    known, graph = import_graph(REPO, PACKAGE)
    cycles = [describe_cycle(c, known, graph, REPO) for c in find_cycles(graph)]
    assert not cycles, "import circles:\n  " + "\n  ".join(cycles)


def test_low_floors_import_nothing_above():
    assert not (bad := floor_violations(REPO, PACKAGE)), "upward imports:\n" + "\n".join(bad)


def test_no_private_names_across_files():
    assert not (bad := private_imports(REPO, PACKAGE)), "private imports:\n" + "\n".join(bad)


def test_method_callbacks_follow_the_base_class():
    bad = callback_violations(REPO / PACKAGE / "callbacks", lightning_hooks(), REPO)
    assert not bad, "callback violations:\n" + "\n".join(bad)


# ---- the checkers on synthetic trees: they find what they should, and only that ------


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).strip() + "\n")


def test_cycle_finder_reports_a_lazy_and_relative_circle(tmp_path):
    write(tmp_path, {"p/__init__.py": "", "p/a.py": "from p import b", "p/b.py": "def f():\n    from . import a"})
    known, graph = import_graph(tmp_path, "p")
    assert find_cycles(graph) == [["p.a", "p.b", "p.a"]]
    assert describe_cycle(["p.a", "p.b", "p.a"], known, graph, tmp_path).splitlines()[1].strip() == "p/a.py:1 imports p.b"
    # a second circle through b is reported too, not folded into the first
    write(tmp_path, {"p/b.py": "from . import a, c", "p/c.py": "import p.b.thing"})
    assert find_cycles(import_graph(tmp_path, "p")[1]) == [["p.a", "p.b", "p.a"], ["p.b", "p.c", "p.b"]]


def test_cycle_finder_passes_a_tree_without_circles(tmp_path):
    write(tmp_path, {
        "p/__init__.py": "from p.core.x import X",  # the package imports down ...
        "p/core/__init__.py": "",
        "p/core/x.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\nX = 1",
        "p/a.py": "from .core import x\nimport p.core.x",  # ... and a sibling imports down
    })
    assert find_cycles(import_graph(tmp_path, "p")[1]) == []
    write(tmp_path, {"p/core/x.py": "from p import a_name"})  # through the package __init__
    assert find_cycles(import_graph(tmp_path, "p")[1]) == [["p", "p.core.x", "p"]]


def test_line_floor_and_private_checkers(tmp_path):
    write(tmp_path, {
        "p/__init__.py": "__version__ = '1'",
        "p/_torchao.py": "",
        "p/core/__init__.py": "",
        "p/core/ok.py": "x = 1\n" * MAX_LINES,
        "p/core/up.py": "def f():\n    from p.callbacks.c import _hidden, __version__",
        "p/quant/q.py": "from p import _torchao\nfrom p.core.ok import x\nfrom p import __version__",
        "p/callbacks/c.py": "x = 1\n" * (MAX_LINES + 1),
    })
    assert long_files(tmp_path, "p") == [f"p/callbacks/c.py: {MAX_LINES + 1} lines (max {MAX_LINES})"]
    assert floor_violations(tmp_path, "p") == ["p/core/up.py:2 core imports p.callbacks.c", "p/quant/q.py:3 quant imports p"]
    assert private_imports(tmp_path, "p") == ["p/core/up.py:2 imports private _hidden from p.callbacks.c"]


CALLBACK = '''
    class {name}(CompressionCallback):
        """Doc.

        Args:
            x: a thing.

        Raises:
            ValueError: bad x.
        """

        @override
        def setup(self, trainer, pl_module, stage): ...

        def helper(self): ...
'''


def test_callback_checker(tmp_path):
    files = {f"callbacks/{f}": CALLBACK.format(name=f[:-3].title()) for f in METHOD_FILES}
    write(tmp_path, {**files, "callbacks/base.py": "class CompressionCallback(Callback): ..."})
    assert callback_violations(tmp_path / "callbacks", {"setup"}, tmp_path) == []
    # a subclass of an intermediate base declared in base.py counts as a CompressionCallback
    layered = files["callbacks/qat.py"].replace("(CompressionCallback)", "(LayerCompressionCallback)")
    base = "class CompressionCallback(Callback): ...\nclass LayerCompressionCallback(CompressionCallback): ..."
    write(tmp_path, {"callbacks/qat.py": layered, "callbacks/base.py": base})
    assert callback_violations(tmp_path / "callbacks", {"setup"}, tmp_path) == []
    write(tmp_path, {"callbacks/base.py": "class CompressionCallback(Callback): ...\nclass LayerCompressionCallback: ..."})
    assert callback_violations(tmp_path / "callbacks", {"setup"}, tmp_path) == [
        "callbacks/qat.py:1 Qat subclasses LayerCompressionCallback, not CompressionCallback"
    ]
    write(tmp_path, {"callbacks/qat.py": files["callbacks/qat.py"]})
    # a plain Callback, no Raises:, a decorator that is not @override; a file without callback
    bad = files["callbacks/lora.py"].replace("(Compression", "(").replace("Raises:", "Notes:").replace("@override", "@no_grad")
    write(tmp_path, {"callbacks/lora.py": bad, "callbacks/export.py": "class _Helper: ...", "callbacks/base.py": ""})
    assert callback_violations(tmp_path / "callbacks", {"setup"}, tmp_path) == [
        "callbacks/base.py: no class CompressionCallback",
        "callbacks/lora.py:1 Lora subclasses Callback, not CompressionCallback",
        "callbacks/lora.py:1 Lora docstring has no Raises: section",
        "callbacks/lora.py:12 Lora.setup overrides a Lightning hook without @override",
        "callbacks/export.py: no callback class",
    ]
