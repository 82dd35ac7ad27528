"""Widgets for any method's config, made from its pydantic schema: the app knows no method by name.

Each field the method adds to the shared ones (`workbench.configs.LayeredConfig`) gets the widget its
type asks for: a number input for numbers, a select box for a choice, a multiselect for a list of choices
or of layers, a table for a list of records (HiDrop's stages); dicts (a rule, measured shares) are shown
as they are. The edited values go back through the config class, which validates them.
"""

from __future__ import annotations

import math
import types
from typing import Any, Literal, Union, get_args, get_origin

import pandas as pd
import streamlit as st
from pydantic import BaseModel

from workbench.configs import LayeredConfig

SHARED_FIELDS = set(LayeredConfig.model_fields)


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without `None`, whether None was allowed)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(get_args(annotation))
    return annotation, False


def _records(frame: pd.DataFrame, record: type[BaseModel]) -> list[dict[str, Any]]:
    """Rows of an edited table as records: empty cells are left out, whole numbers where the field is an int."""
    rows = []
    for row in frame.to_dict("records"):
        values = {}
        for name, value in row.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            annotation, _ = _without_none(record.model_fields[name].annotation)
            values[name] = int(value) if annotation is int else value
        if values:
            rows.append(values)
    return rows


def field_widget(name: str, annotation: Any, value: Any, key: str, num_layers: int) -> Any:
    """One field's widget, pre-filled with `value`; returns the edited value."""
    annotation, optional = _without_none(annotation)
    origin, label = get_origin(annotation), name.replace("_", " ")
    if annotation in (int, float):
        if annotation is int:
            number = st.number_input(label, value=None if value is None else int(value), step=1, key=key)
        else:
            step = 0.05 if value is None or abs(value) <= 1 else 0.5
            number = st.number_input(label, value=None if value is None else float(value), step=step, key=key)
        return None if number is None else annotation(number)
    if origin is Literal:
        options = list(get_args(annotation))
        return st.selectbox(label, options, index=options.index(value), key=key)
    if origin is list:
        (item,) = get_args(annotation)
        if get_origin(item) is Literal:
            return st.multiselect(label, list(get_args(item)), default=value, key=key)
        if item is int:  # a list of decoder layers
            chosen = st.multiselect(f"{label} (0-indexed layers)", list(range(num_layers)), default=value or [], key=key)
            return sorted(chosen) or (None if optional else [])
        if isinstance(item, type) and issubclass(item, BaseModel):
            frame = pd.DataFrame(value, columns=list(item.model_fields))
            return _records(st.data_editor(frame, num_rows="dynamic", key=key, hide_index=True), item)
    st.caption(f"{label}: {value}")  # derived from the run (a rule, measured shares): shown, not edited
    return value


def edit_config(config_class: type[BaseModel], data: dict[str, Any], key: str) -> dict[str, Any]:
    """Widgets for the fields `config_class` adds to the shared ones; returns the edited copy of `data`."""
    edited = dict(data)
    for name, field in config_class.model_fields.items():
        if name in SHARED_FIELDS or name not in data:
            continue
        edited[name] = field_widget(name, field.annotation, data[name], f"{key}_{name}", data.get("num_llm_layers", 1))
    return edited
