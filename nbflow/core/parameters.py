"""Strict parameters. papermill only warns about an unknown name and injects whatever it is given;
nbflow rejects a bad request before any run exists, and converts values to the declared type.

The spec of a parameter comes from papermill's inspection of the ``parameters`` cell. papermill only
knows a type when the source annotates it (``days: int = 7``), so the type of ``n = 3`` is inferred here
from its default value.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from nbflow import checks
from nbflow.errors import ParameterError

KNOWN_TYPES = ("str", "int", "float", "bool", "list", "dict")
_ALIASES = {"List": "list", "Dict": "dict", "string": "str", "integer": "int", "boolean": "bool"}


def _type_from_annotation(annotation: str) -> tuple[str, bool]:
    """Map an annotation such as ``Optional[int]`` or ``List[str]`` to (type, nullable)."""
    ann = annotation.replace(" ", "")
    nullable = False
    if ann.startswith("Optional[") and ann.endswith("]"):
        ann, nullable = ann[len("Optional[") : -1], True
    parts = [p for p in ann.split("|") if p]
    if "None" in parts:
        nullable = True
        parts = [p for p in parts if p != "None"]
    base = parts[0].split("[", 1)[0] if len(parts) == 1 else "any"
    base = _ALIASES.get(base, base)
    return (base if base in KNOWN_TYPES else "any"), nullable


def _literal(source: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def python_parameters_missed(source: str, known: set[str]) -> list[Any]:
    """Assignments in a Python ``parameters`` cell that papermill's line regex does not see.

    papermill skips annotations it cannot parse with its regex, such as ``u: int | None = 5``; it
    still injects a value for ``u`` (it only warns about names it does not know), so nbflow would reject
    a valid parameter. Python's own parser sees every top-level assignment.
    """
    import ast

    from papermill.models import Parameter

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    found = []
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, annotation = node.target.id, ast.unparse(node.annotation)
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)):
            name, annotation = node.targets[0].id, "None"
        else:
            continue
        if name in known:
            continue
        default = ast.get_source_segment(source, node.value) or "None"
        line = lines[(node.end_lineno or node.lineno) - 1]
        comment = line.split("#", 1)[1].strip() if "#" in line[node.end_col_offset or 0:] else ""
        found.append(Parameter(name=name, inferred_type_name=annotation, default=default, help=comment))
    return found


def spec_from_papermill(params: list[Any]) -> dict[str, dict[str, Any]]:
    """Turn papermill ``Parameter`` tuples into nbflow's JSON spec: name -> {type, nullable, default, ...}."""
    spec: dict[str, dict[str, Any]] = {}
    for p in params:
        ok, default = _literal(p.default)
        try:
            json.dumps(default, allow_nan=False)
        except (TypeError, ValueError):
            ok, default = False, None
        declared = p.inferred_type_name
        if declared not in ("None", "NoneType", "", None):
            ptype, nullable = _type_from_annotation(declared)
        elif ok and default is not None:
            ptype, nullable = type(default).__name__, False
            ptype = ptype if ptype in KNOWN_TYPES else "any"
        else:
            ptype, nullable = "any", True
        spec[p.name] = {
            "type": ptype,
            "nullable": nullable or default is None,
            "default": default if ok else None,
            "default_source": p.default,
            "help": p.help or "",
        }
    return spec


def _convert_text(name: str, ptype: str, text: str) -> Any:
    """Convert a value given as text (``-p n 3`` on the command line) to ``ptype``."""
    if ptype == "str":
        return text
    if ptype == "int":
        try:
            return int(text.strip().replace("_", ""))
        except ValueError:
            raise ParameterError(f"parameter {name!r} expects an int, got {text!r}") from None
    if ptype == "float":
        try:
            return float(text)
        except ValueError:
            raise ParameterError(f"parameter {name!r} expects a float, got {text!r}") from None
    if ptype == "bool":
        low = text.strip().lower()
        if low in ("true", "1", "yes", "y", "on"):
            return True
        if low in ("false", "0", "no", "n", "off"):
            return False
        raise ParameterError(f"parameter {name!r} expects a bool (true/false), got {text!r}")
    if ptype in ("list", "dict"):
        value: Any
        try:
            value = json.loads(text)
        except ValueError:
            ok, value = _literal(text)
            if not ok:
                raise ParameterError(
                    f"parameter {name!r} expects a {ptype} (JSON or a Python literal), got {text!r}"
                ) from None
        return value
    # Unknown type: papermill's own resolution of a command-line value.
    for caster in (int, float):
        try:
            return caster(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def _article(ptype: str) -> str:
    return f"an {ptype}" if ptype == "int" else f"a {ptype}"


def _check_value(name: str, ptype: str, value: Any) -> Any:
    """Check (and where lossless, convert) a typed value, as a JSON body or a Python call gives it."""
    if ptype == "any":
        return value
    if ptype == "float" and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ParameterError(f"parameter {name!r}: the int is too large for a float") from None
    if ptype == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    expected = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}[ptype]
    ok = False if isinstance(value, bool) and ptype != "bool" else isinstance(value, expected)
    if ptype == "list" and isinstance(value, tuple):
        return list(value)
    if not ok:
        raise ParameterError(f"parameter {name!r} expects {_article(ptype)}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"parameter {name!r} must be a finite number, got {value!r}")
    return value


def validate(spec: dict[str, dict[str, Any]], values: dict[str, Any], *, has_parameters_cell: bool = True
             ) -> dict[str, Any]:
    """Return ``values`` converted to the spec's types, or raise ``ParameterError`` naming the problem.

    Strings are parsed for their declared type (the CLI gives only strings); other values are checked.
    A notebook without a ``parameters`` cell accepts any names, as papermill does (they are injected at
    the top), because there is nothing to check them against.
    """
    if not isinstance(values, dict):
        raise ParameterError(f"parameters must be an object {{name: value}}, got {type(values).__name__}")
    for name in values:
        checks.text(name, field="a parameter name", error=ParameterError, max_length=checks.MAX_NAME_LENGTH)
    if not has_parameters_cell:
        return _json_checked(dict(values))
    unknown = sorted(set(values) - set(spec))
    if unknown:
        valid = ", ".join(sorted(spec)) or "none: the notebook declares no parameters"
        noun = "parameter" if len(unknown) == 1 else "parameters"
        raise ParameterError(f"unknown {noun} {', '.join(map(repr, unknown))}; valid parameters: {valid}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        entry = spec[name]
        ptype = entry.get("type", "any")
        if value is None:
            if not entry.get("nullable", True) and ptype != "any":
                raise ParameterError(f"parameter {name!r} expects {_article(ptype)}, got None")
            out[name] = None
            continue
        if isinstance(value, str) and ptype != "str":
            value = _convert_text(name, ptype, value)
        out[name] = _check_value(name, ptype, value)
    return _json_checked(out)


def _json_checked(values: dict[str, Any]) -> dict[str, Any]:
    """Parameters are stored as JSON: NaN, infinities, arbitrary objects and text that is not valid
    Unicode (a lone surrogate, which SQLite would store and then fail to read back) or holds a NUL
    (which PostgreSQL refuses) are refused up front, so the one message names the parameter."""
    for name, value in values.items():
        checks.json_value(value, field=f"parameter {name!r}", error=ParameterError)
    try:
        json.dumps(values, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"parameters must be JSON-serialisable: {exc}") from None
    return values
