"""Page 4, export: any registered method's config, pre-filled from a run's recommendations, edited here,
validated by the config class `wb train` reads, with its visual tokens per layer and counted FLOPs against
dense; download the YAML or save it to a file under the run root (an existing file only when "overwrite" is
ticked). Every method comes from the registry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import streamlit as st
from pydantic import BaseModel, ValidationError

from apps import state
from apps.config_form import edit_config
from apps.flops_view import cost_panel
from apps.run_root import path_under_root, run_root
from efficient_models.export import build_config, exportable_methods
from efficient_models.registry import load_config, methods
from workbench.configs import config_yaml, error_lines
from workbench.errors import InputError, WorkbenchError
from workbench.files import write_text_atomically


@st.cache_data(show_spinner=False)
def prefill(folder: str, method: str, stamp: float) -> dict:
    """The config `wb export-config` would write for this run and method, as plain data."""
    return build_config(folder, method).model_dump(mode="json")


def validate(data: dict) -> tuple[BaseModel | None, list[str]]:
    """The typed config of `data["method"]`, or the validation errors as 'where: message' lines."""
    known = methods()
    if data.get("method") not in known:
        return None, [f"method: unknown method {data.get('method')!r}; choose one of {', '.join(known)}"]
    try:
        return known[data["method"]].config.model_validate(data), []
    except ValidationError as error:
        return None, error_lines(error)


def overwrite_confirmed(target: Path) -> bool:
    """For an existing `target`, an "overwrite" box that must be ticked; it is new (unticked) for each version
    of the file, so one tick replaces one version."""
    if not target.exists():
        return True
    version = hashlib.sha1(f"{target}|{target.stat().st_mtime_ns}".encode()).hexdigest()[:8]
    return st.checkbox(f"overwrite the existing {target.name}", key=f"save_overwrite_{version}")


def save_panel(config: BaseModel, text: str) -> None:
    st.code(text, language="yaml")
    st.download_button("Download YAML", text, file_name=f"{config.method}.yaml", mime="application/x-yaml",
                       key="download")
    root = run_root()
    name = st.text_input("Save to file (a name under the run root)", value=f"configs/{config.method}.yaml",
                         key="save_path", help=f"the run root is {root}")
    try:
        target = path_under_root(root, name)
    except InputError as error:
        st.error(str(error))
        return
    st.caption(f"saves `{target}`")
    confirmed = overwrite_confirmed(target)
    if st.button("Save", key="save"):
        if not confirmed:
            st.error(f"{target} exists: tick 'overwrite' to replace it")
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(target, text)
            load_config(target)  # what training reads must validate
        except (OSError, WorkbenchError) as error:
            st.error(f"cannot save {target}: {error}")
        else:
            st.success(f"saved {target}; train with it by passing this file to the efficient model")


def render() -> None:
    st.title("Export a config")
    view = state.run_picker("Run", key="export_run")
    sources = exportable_methods()
    method = st.selectbox("Method", list(sources), key="export_method",
                          format_func=lambda name: f"{name}: {methods()[name].summary} ({sources[name]} run)")
    if view is None:
        return
    try:
        data = prefill(view.folder, method, state.folder_stamp(view.folder))
    except WorkbenchError as error:
        st.error(str(error))
        return
    key = hashlib.sha1(f"{view.folder}|{method}".encode()).hexdigest()[:8]
    edited = edit_config(methods()[method].config, data, key)
    config, errors = validate(edited)
    for line in errors:
        st.error(line)
    if config is None:
        return
    cost_panel(config)
    save_panel(config, config_yaml(config, f"{config.method} config exported by the workbench app from {view.folder}"))


if __name__ == "__main__":
    render()
