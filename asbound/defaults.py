"""Defaults and choices the command line shows, without importing torch.

The config dataclasses (``ScoreConfig``, ``TransferConfig``, ``PredictConfig``) and the tuples of
valid choices are declared in modules that import torch, which takes seconds; the parser needs
only their values. :func:`config_defaults` and :func:`constant` read those values from the
declaring module's source: a literal (``ast.literal_eval``), a subscript of one, or a name bound
at module level (also through ``from asbound.x import NAME``) to one. The declaration stays the
only place a default is written. A value that is not such a literal is taken from the imported
module instead: correct, only slower (``tests/test_cli.py`` checks that the command line never
needs that).

This module imports the standard library only (platformdirs when a default folder is asked
for), so the lowest modules may import it: the default data and model folders live here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import os
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent


class NotLiteral(Exception):
    """A declaration whose value :mod:`ast` alone cannot give."""


def default_model_dir() -> Path:
    """RobustBench's model directory: ``$ASBOUND_MODEL_DIR`` or the user cache."""
    env = os.environ.get("ASBOUND_MODEL_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("asbound")) / "models"


def default_data_root() -> Path:
    """``$ASBOUND_DATA_ROOT`` if set, else ``<user cache dir>/asbound/data``."""
    env = os.environ.get("ASBOUND_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("asbound")) / "data"


def config_defaults(module: str, name: str, *, strict: bool = False) -> "dict[str, Any]":
    """``{field: default}`` of the dataclass ``module.name`` (fields without a default left out).

    ``strict``: raise :class:`NotLiteral` rather than import the module when a default is not a
    literal.
    """
    try:
        return _read_fields(module, name)
    except NotLiteral:
        if strict:
            raise
    cls = getattr(importlib.import_module(module), name)
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


def constant(module: str, name: str, *, strict: bool = False) -> Any:
    """The value of ``module.name``, a module-level literal (``strict``: as :func:`config_defaults`)."""
    try:
        return _lookup(module, name, ())
    except NotLiteral:
        if strict:
            raise
    return getattr(importlib.import_module(module), name)


def first_arguments(module: str, name: str, callee: str, *, strict: bool = False) -> "tuple[Any, ...]":
    """The first argument of each call to ``callee`` in the declaration of ``module.name``, in
    order: the names of a registry declared as ``{m.name: m for m in (Method("lp", ...), ...)}``.
    Without ``strict``, a declaration that is not of that form gives the keys of the imported
    ``module.name``."""
    try:
        node = _binding(module, name)
        if not isinstance(node, ast.expr):
            raise NotLiteral(f"{module}.{name} is imported, not declared")
        names = []
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == callee:
                if not call.args:
                    raise NotLiteral(f"a call to {callee} in {module}.{name} has no positional argument")
                names.append(_value(call.args[0], module, ()))
        if not names:
            raise NotLiteral(f"{module}.{name} makes no call to {callee}")
        return tuple(names)
    except NotLiteral:
        if strict:
            raise
    return tuple(getattr(importlib.import_module(module), name))


# --- reading a module's source ---------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _source(module: str) -> ast.Module:
    parts = module.split(".")
    if parts[0] != "asbound":
        raise NotLiteral(f"{module} is not part of asbound")
    base = _PACKAGE.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return ast.parse(path.read_text(encoding="utf-8"), str(path))
    raise NotLiteral(f"no source for {module} under {_PACKAGE}")


def _binding(module: str, name: str) -> "ast.expr | tuple[str, str]":
    """The expression last bound to ``name`` at the top level of ``module``, or, for a name
    imported there, (the module it comes from, its name there)."""
    found: "ast.expr | tuple[str, str] | None" = None
    for stmt in _source(module).body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
            found = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
            if stmt.value is not None:
                found = stmt.value
        elif isinstance(stmt, ast.ImportFrom):  # absolute imports only: asbound has no relative ones
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    found = (stmt.module or "", alias.name) if not stmt.level else None
    if found is None:
        raise NotLiteral(f"{module} binds no {name} at its top level (from an absolute import or an assignment)")
    return found


def _lookup(module: str, name: str, seen: "tuple[tuple[str, str], ...]") -> Any:
    if (module, name) in seen:
        raise NotLiteral(f"{module}.{name} refers to itself")
    seen = seen + ((module, name),)
    node = _binding(module, name)
    if isinstance(node, tuple):
        return _lookup(*node, seen)
    return _value(node, module, seen)


def _value(node: ast.expr, module: str, seen: "tuple[tuple[str, str], ...]") -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        pass
    if isinstance(node, ast.Name):
        return _lookup(module, node.id, seen)
    if isinstance(node, ast.Subscript):
        try:
            return _value(node.value, module, seen)[ast.literal_eval(node.slice)]
        except (ValueError, TypeError, SyntaxError, LookupError) as exc:
            raise NotLiteral(f"{ast.unparse(node)} in {module}: {exc}") from None
    raise NotLiteral(f"{ast.unparse(node)} in {module} is not a literal")


def _read_fields(module: str, name: str) -> "dict[str, Any]":
    cls = next((s for s in _source(module).body if isinstance(s, ast.ClassDef) and s.name == name), None)
    if cls is None:
        raise NotLiteral(f"{module} declares no class {name}")
    if cls.bases or not any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
        raise NotLiteral(f"{module}.{name} is not a dataclass without bases")
    values = {}
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if any(word in ast.unparse(stmt.annotation) for word in ("ClassVar", "InitVar")):
            continue
        if stmt.value is not None:
            values[stmt.target.id] = _value(stmt.value, module, ())
    return values
