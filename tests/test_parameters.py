"""nbflow.core.parameters: the spec inferred from a real notebook's ``parameters`` cell, and ``validate``.

Specs come from real nbformat notebooks through nbflow's own path (``flows.parse_notebook`` then
``flows.inspect_parameters``, i.e. papermill's ``_infer_parameters`` and ``spec_from_papermill``); no
kernel is started. ``validate`` is tested against hand-written specs as well, to pin each rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest

from nbflow.core.flows import inspect_parameters, parse_notebook
from nbflow.core.parameters import spec_from_papermill, validate
from nbflow.errors import ParameterError


def notebook_text(parameters: str | None, *, other: str = "print('hi')") -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.language_info = {"name": "python"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata.tags = ["parameters"]
        nb.cells.append(cell)
    nb.cells.append(nbformat.v4.new_code_cell(other))
    return nbformat.writes(nb)


def inspect(parameters: str | None) -> tuple[dict[str, dict[str, Any]], bool]:
    source = parse_notebook(notebook_text(parameters), Path("/tmp/inspected.ipynb"))
    return inspect_parameters(source, "python3")


PARAMETERS_CELL = """\
# A comment line is not a parameter
name = "World"  # who to greet
n = 3
neg = -2
ratio = 0.5
flag = True
items = [1, "a"]
opts = {"a": 1, "b": [2]}
nothing = None
days: int = 7  # how many days back
maybe: Optional[int] = None
tags: List[str] = []
mapping: Dict[str, int] = {}
label: str = None
exponent = 10 ** 3
pair = (1, 2)
"""


@pytest.fixture(scope="module")
def spec() -> dict[str, dict[str, Any]]:
    spec, has_cell = inspect(PARAMETERS_CELL)
    assert has_cell
    return spec


# -- the spec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ptype", "nullable", "default"),
    [
        ("name", "str", False, "World"),
        ("n", "int", False, 3),
        ("neg", "int", False, -2),
        ("ratio", "float", False, 0.5),
        ("flag", "bool", False, True),
        ("items", "list", False, [1, "a"]),
        ("opts", "dict", False, {"a": 1, "b": [2]}),
        ("nothing", "any", True, None),
    ],
)
def test_type_inferred_from_default(
    spec: dict[str, dict[str, Any]], name: str, ptype: str, nullable: bool, default: Any
) -> None:
    entry = spec[name]
    assert (entry["type"], entry["nullable"], entry["default"]) == (ptype, nullable, default)
    assert type(entry["default"]) is type(default)  # bool stays bool, int stays int


@pytest.mark.parametrize(
    ("name", "ptype", "nullable", "default"),
    [
        ("days", "int", False, 7),
        ("maybe", "int", True, None),
        ("tags", "list", False, []),
        ("mapping", "dict", False, {}),
        ("label", "str", True, None),  # annotated str, but its default None makes it nullable
    ],
)
def test_type_from_annotation(
    spec: dict[str, dict[str, Any]], name: str, ptype: str, nullable: bool, default: Any
) -> None:
    entry = spec[name]
    assert (entry["type"], entry["nullable"], entry["default"]) == (ptype, nullable, default)


def test_defaults_that_are_not_literals_have_any_type(spec: dict[str, dict[str, Any]]) -> None:
    assert spec["exponent"]["type"] == "any"
    assert spec["exponent"]["default"] is None
    assert spec["exponent"]["default_source"] == "10 ** 3"
    assert spec["pair"]["type"] == "any"  # a tuple is not one of the known types


def test_help_comments_and_sources_are_kept(spec: dict[str, dict[str, Any]]) -> None:
    assert spec["name"]["help"] == "who to greet"
    assert spec["days"]["help"] == "how many days back"
    assert spec["n"]["help"] == ""
    assert spec["name"]["default_source"] == '"World"'
    assert spec["opts"]["default_source"] == '{"a": 1, "b": [2]}'


def test_spec_lists_exactly_the_assignments(spec: dict[str, dict[str, Any]]) -> None:
    assert list(spec) == [
        "name",
        "n",
        "neg",
        "ratio",
        "flag",
        "items",
        "opts",
        "nothing",
        "days",
        "maybe",
        "tags",
        "mapping",
        "label",
        "exponent",
        "pair",
    ]


def test_spec_is_json(spec: dict[str, dict[str, Any]]) -> None:
    import json

    assert json.loads(json.dumps(spec, allow_nan=False)) is not None


def test_spec_from_papermill_directly() -> None:
    from papermill.inspection import _infer_parameters

    nb = nbformat.reads(notebook_text("days: int = 7  # window\nrate = 1.5\nx = float('nan')"), as_version=4)
    for cell in nb.cells:  # papermill's helpers expect every cell to have a tags list
        cell.metadata.setdefault("tags", [])
    spec = spec_from_papermill(_infer_parameters(nb, name="python3", language="python"))
    assert spec["days"] == {"type": "int", "nullable": False, "default": 7, "default_source": "7", "help": "window"}
    assert spec["rate"]["type"] == "float"
    assert spec["x"]["type"] == "any"
    assert spec["x"]["default"] is None  # not a literal (and NaN is not JSON)


def test_notebook_without_parameters_cell() -> None:
    spec, has_cell = inspect(None)
    assert (spec, has_cell) == ({}, False)


def test_empty_parameters_cell() -> None:
    spec, has_cell = inspect("# nothing to see")
    assert (spec, has_cell) == ({}, True)


def test_pep604_annotation_is_a_parameter() -> None:
    # papermill's regex drops this line; nbflow's ast fallback keeps it (papermill would inject it anyway)
    spec, _ = inspect("a = 1  # first\nu: int | None = 5  # maybe\nv: list[str] | None = None")
    assert list(spec) == ["a", "u", "v"]
    assert spec["u"] == {"type": "int", "nullable": True, "default": 5, "default_source": "5", "help": "maybe"}
    assert spec["v"]["type"] == "list" and spec["v"]["nullable"] is True
    assert validate(spec, {"u": "3"}) == {"u": 3}


# -- validate: text from the command line -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("n", "3", 3),
        ("n", "-1", -1),
        ("n", " 7 ", 7),
        ("n", "1_000", 1000),
        ("ratio", "1.5", 1.5),
        ("ratio", "1e-3", 0.001),
        ("ratio", "3", 3.0),
        ("name", "3", "3"),
        ("name", "", ""),
        ("flag", "true", True),
        ("flag", "false", False),
        ("flag", "TRUE", True),
        ("flag", "Yes", True),
        ("flag", "off", False),
        ("flag", "1", True),
        ("flag", "0", False),
        ("items", "[1, 2]", [1, 2]),
        ("items", '["a", null]', ["a", None]),
        ("items", "['a', 'b']", ["a", "b"]),
        ("items", "(1, 2)", [1, 2]),
        ("items", "[]", []),
        ("opts", '{"a": 1}', {"a": 1}),
        ("opts", "{'a': [1, True]}", {"a": [1, True]}),
        ("tags", '["x"]', ["x"]),
        ("maybe", "5", 5),
        ("days", "14", 14),
    ],
)
def test_text_is_converted_to_the_declared_type(
    spec: dict[str, dict[str, Any]], name: str, text: str, expected: Any
) -> None:
    value = validate(spec, {name: text})[name]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", 5),
        ("1.5", 1.5),
        ("True", True),
        ("False", False),
        ("None", None),
        ("abc", "abc"),
        ("true", "true"),
    ],
)
def test_text_for_an_untyped_parameter_follows_papermill(
    spec: dict[str, dict[str, Any]], text: str, expected: Any
) -> None:
    value = validate(spec, {"nothing": text})["nothing"]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("name", "text", "facts"),
    [
        ("n", "abc", ["'n'", "expects an int", "'abc'"]),
        ("n", "1.5", ["'n'", "expects an int", "'1.5'"]),
        ("n", "true", ["'n'", "expects an int"]),
        ("n", "", ["'n'", "expects an int"]),
        ("ratio", "fast", ["'ratio'", "expects a float", "'fast'"]),
        ("ratio", "nan", ["'ratio'", "finite"]),
        ("ratio", "inf", ["'ratio'", "finite"]),
        ("ratio", "-1e400", ["'ratio'", "finite"]),
        ("flag", "maybe", ["'flag'", "expects a bool", "'maybe'"]),
        ("flag", "", ["'flag'", "expects a bool"]),
        ("items", "[1, 2", ["'items'", "expects a list", "'[1, 2'"]),
        ("items", '{"a": 1}', ["'items'", "expects a list", "dict"]),
        ("items", "3", ["'items'", "expects a list", "int"]),
        ("opts", "[1]", ["'opts'", "expects a dict", "list"]),
        ("opts", "{not json", ["'opts'", "expects a dict"]),
        ("items", "[NaN]", ["JSON"]),
        ("opts", "{(1, 2): 3}", ["JSON"]),
    ],
)
def test_text_that_does_not_convert_is_rejected(
    spec: dict[str, dict[str, Any]], name: str, text: str, facts: list[str]
) -> None:
    with pytest.raises(ParameterError) as info:
        validate(spec, {name: text})
    message = str(info.value)
    assert "\n" not in message
    for fact in facts:
        assert fact in message


# -- validate: typed values (a JSON body, a Python call) ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ratio", 3, 3.0),  # int widens to float
        ("ratio", 0.25, 0.25),
        ("n", 4.0, 4),  # an integral float narrows to int
        ("n", 4, 4),
        ("flag", False, False),
        ("items", (1, 2), [1, 2]),
        ("items", ["a"], ["a"]),
        ("opts", {"k": [1]}, {"k": [1]}),
        ("name", "Ada", "Ada"),
        ("nothing", {"any": "thing"}, {"any": "thing"}),
        ("maybe", None, None),
        ("nothing", None, None),
        ("label", None, None),
    ],
)
def test_typed_values_are_checked_and_widened(
    spec: dict[str, dict[str, Any]], name: str, value: Any, expected: Any
) -> None:
    out = validate(spec, {name: value})[name]
    assert out == expected
    assert type(out) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "facts"),
    [
        ("n", True, ["'n'", "int", "bool"]),
        ("n", False, ["'n'", "int", "bool"]),
        ("n", 1.5, ["'n'", "int", "1.5"]),
        ("n", float("inf"), ["'n'", "int"]),
        ("n", [3], ["'n'", "int", "list"]),
        ("ratio", True, ["'ratio'", "float", "bool"]),
        ("ratio", float("nan"), ["'ratio'", "finite"]),
        ("ratio", float("inf"), ["'ratio'", "finite"]),
        ("ratio", float("-inf"), ["'ratio'", "finite"]),
        ("name", 3, ["'name'", "str", "int"]),
        ("flag", 1, ["'flag'", "bool", "int"]),
        ("items", {"a": 1}, ["'items'", "list", "dict"]),
        ("opts", [1], ["'opts'", "dict", "list"]),
        ("nothing", float("nan"), ["JSON"]),
        ("nothing", object(), ["JSON"]),
    ],
)
def test_typed_values_of_the_wrong_type_are_rejected(
    spec: dict[str, dict[str, Any]], name: str, value: Any, facts: list[str]
) -> None:
    with pytest.raises(ParameterError) as info:
        validate(spec, {name: value})
    for fact in facts:
        assert fact in str(info.value)


@pytest.mark.parametrize("name", ["n", "ratio", "flag", "name", "items", "opts", "days", "tags"])
def test_none_is_rejected_for_a_non_nullable_parameter(spec: dict[str, dict[str, Any]], name: str) -> None:
    with pytest.raises(ParameterError, match=rf"parameter '{name}' expects an? \w+, got None"):
        validate(spec, {name: None})


def test_huge_int_for_a_float_is_a_parameter_error(spec: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(ParameterError, match="ratio"):
        validate(spec, {"ratio": 10**400})


# -- validate: names ----------------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_ones(spec: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(ParameterError) as info:
        validate(spec, {"nn": "1", "n": "2"})
    message = str(info.value)
    assert "unknown parameter 'nn'" in message
    assert "valid parameters: " + ", ".join(sorted(spec)) in message


def test_several_unknown_names_are_all_named(spec: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(ParameterError, match=r"unknown parameters 'aa', 'zz'; valid parameters: days, "):
        validate(spec, {"zz": 1, "aa": 2})


def test_unknown_name_when_the_cell_declares_nothing() -> None:
    with pytest.raises(ParameterError, match="unknown parameter 'x'; valid parameters: none"):
        validate({}, {"x": 1}, has_parameters_cell=True)


def test_no_values_is_valid(spec: dict[str, dict[str, Any]]) -> None:
    assert validate(spec, {}) == {}


def test_several_values_at_once_and_input_is_not_mutated(spec: dict[str, dict[str, Any]]) -> None:
    given = {"n": "5", "ratio": 2, "flag": "no", "items": "[3]", "name": "Ada"}
    before = dict(given)
    assert validate(spec, given) == {"n": 5, "ratio": 2.0, "flag": False, "items": [3], "name": "Ada"}
    assert given == before


def test_spec_entry_without_a_type_accepts_anything() -> None:
    assert validate({"x": {}}, {"x": [1, {"a": None}]}) == {"x": [1, {"a": None}]}
    assert validate({"x": {}}, {"x": None}) == {"x": None}


# -- validate: no parameters cell ---------------------------------------------------------------------


def test_without_parameters_cell_anything_is_accepted_as_given() -> None:
    values = {"x": "5", "anything": [1, 2], "none": None, "flag": True}
    out = validate({}, values, has_parameters_cell=False)
    assert out == values
    assert out["x"] == "5"  # docs/cli.md: "the values are passed as given"
    assert out is not values


def test_without_parameters_cell_the_spec_is_not_consulted() -> None:
    spec = {"n": {"type": "int", "nullable": False}}
    assert validate(spec, {"n": "abc", "other": 1}, has_parameters_cell=False) == {"n": "abc", "other": 1}


@pytest.mark.parametrize("value", [float("nan"), object()], ids=["nan", "object"])
def test_without_parameters_cell_values_must_still_be_json(value: Any) -> None:
    with pytest.raises(ParameterError):
        validate({}, {"x": value}, has_parameters_cell=False)
