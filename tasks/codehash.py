"""The code part of an artifact key: what a stage runs, hashed as code, not as text.

A module is hashed through its syntax tree with docstrings removed (comments never reach the tree, nor do
line numbers), so editing a comment or a docstring keeps every key, while any change to what runs re-keys
the stages that run it. A stage declares the modules it calls; the project modules those import
(at the top or inside functions) are followed to the end. The glue in `tasks/stages.py` is hashed per
function: a stage's own functions and the module-level functions they name, so editing one stage's glue
re-keys that stage only.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

PACKAGES = ("tasks",)  # project code; third-party libraries are pinned by the installed versions


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def _tree(path: str, mtime_ns: int) -> ast.Module:
    return _strip_docstrings(ast.parse(Path(path).read_text(encoding="utf-8"), filename=path))  # type: ignore[return-value]


def module_tree(name: str) -> ast.Module:
    path = module_path(name)
    return _tree(str(path), path.stat().st_mtime_ns)


def module_path(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no source for module {name}")
    return Path(spec.origin)


def node_hash(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node, annotate_fields=True, include_attributes=False).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _module_hash(path: str, mtime_ns: int) -> str:
    return node_hash(_tree(path, mtime_ns))


def _imports(name: str) -> set[str]:
    """Project modules that module `name` imports, anywhere in its code."""
    found: set[str] = set()
    package = name if module_path(name).name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(module_tree(name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            # `from tasks import seeds` names a module; `from tasks.text import word_count` a function.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES and _is_module(m)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # `tasks.config.SeedsConfig`: a name inside a module
        return False


def module_closure(names: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """`names` and every project module they import, transitively, minus `exclude` (sorted)."""
    excluded = set(exclude)
    seen: set[str] = set()
    todo = [n for n in names if n not in excluded]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(m for m in _imports(name) if m not in seen and m not in excluded)
    return sorted(seen)


def function_closure(module: str, roots: Iterable[str], stop: Iterable[str] = ()) -> dict[str, ast.AST]:
    """The module-level functions (and constants) of `module` named in `roots` and, transitively, in them;
    names in `stop` (a registry of every stage, say) are not followed."""
    defs: dict[str, ast.AST] = {}
    for node in module_tree(module).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    defs[target.id] = node
    for name in stop:
        defs.pop(name, None)
    chosen: dict[str, ast.AST] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in chosen or name not in defs:
            continue
        chosen[name] = defs[name]
        todo.extend(n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id not in chosen)
    return chosen


def code_hash(modules: Iterable[str], glue_module: str | None = None, glue_roots: Iterable[str] = (),
              glue_stop: Iterable[str] = (), exclude: Iterable[str] = ()) -> tuple[str, list[str]]:
    """The hash of `modules` with their project imports and of the glue functions; also what it covers."""
    digest = hashlib.sha256()
    covered = module_closure(modules, exclude=[*exclude, *([glue_module] if glue_module else [])])
    for name in covered:
        path = module_path(name)
        digest.update(f"module {name}\0{_module_hash(str(path), path.stat().st_mtime_ns)}\n".encode())
    if glue_module:
        for name, node in sorted(function_closure(glue_module, glue_roots, glue_stop).items()):
            digest.update(f"glue {glue_module}.{name}\0{node_hash(node)}\n".encode())
            covered.append(f"{glue_module}.{name}")
    return digest.hexdigest(), covered
