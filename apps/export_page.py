"""Page 4, export: a pruning / injection / HiDrop / ViCA schedule pre-filled from a run's recommendations,
edited here, validated by the config classes `wb train` reads, with the visual tokens per layer and the
estimated prefill FLOPs saving; download the YAML or save it to a file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import yaml
from pydantic import BaseModel, ValidationError

from apps import state
from apps.flops import SMOLLM2_135M, DecoderShape, estimate_flops, visual_tokens_per_layer
from workbench.configs import METHODS, HiDropConfig, InjectionConfig, PruneConfig, ViCAConfig, build_config, load_config
from workbench.errors import WorkbenchError

METHOD_HELP = {"prune": "keep only tokens of some categories (needs a tokens run, or a run with one inside)",
               "injection": "visual tokens enter at one layer (alignment or similarity run)",
               "hidrop": "late injection, pruning stages, early exit (similarity run)",
               "vica": "visual tokens skip the layers; text cross-attends at a few layers (similarity run)"}

CLASSES = {"prune": PruneConfig, "injection": InjectionConfig, "hidrop": HiDropConfig, "vica": ViCAConfig}


@st.cache_data(show_spinner=False)
def prefill(folder: str, method: str, stamp: float) -> dict:
    """The config `wb export-config` would write for this run and method, as plain data."""
    return build_config(folder, method).model_dump(mode="json")


def validate(data: dict) -> tuple[BaseModel | None, list[str]]:
    """The typed config of `data["method"]`, or the validation errors as 'where: message' lines."""
    try:
        return CLASSES[data.get("method")].model_validate(data), []
    except KeyError:
        return None, [f"method: unknown method {data.get('method')!r}; choose one of {', '.join(METHODS)}"]
    except ValidationError as error:
        return None, [f"{'.'.join(str(part) for part in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()]


def config_yaml(config: BaseModel) -> str:
    return (f"# {config.method} config exported by the workbench app from {config.provenance.run}\n"
            + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def edit(data: dict, key: str) -> dict:
    """Widgets for the method's schedule, pre-filled from `data`; returns the edited copy."""
    data = dict(data)
    layers = data["num_llm_layers"]
    method = data["method"]
    if method == "prune":
        data["keep_categories"] = st.multiselect("Keep visual tokens of categories", ["sink", "dead", "alive"],
                                                 default=data["keep_categories"], key=f"{key}_keep")
        st.caption("measured fractions in the run: " + ", ".join(
            f"{name} {share:.1%}" for name, share in data["measured_fractions"].items()))
    if method in ("injection", "hidrop"):
        data["inject_layer"] = int(st.number_input("Inject visual tokens at layer", value=data["inject_layer"], step=1,
                                                   key=f"{key}_inject"))
    if method == "hidrop":
        data["exit_layer"] = int(st.number_input("Exit: drop all visual tokens at layer", value=data["exit_layer"],
                                                 step=1, key=f"{key}_exit"))
        data["schedule_power"] = float(st.number_input("Schedule power", value=float(data["schedule_power"]),
                                                       step=0.5, key=f"{key}_power"))
        stages = st.data_editor(pd.DataFrame(data["stages"], columns=["start_layer", "keep_fraction"]),
                                num_rows="dynamic", key=f"{key}_stages", hide_index=True)
        data["stages"] = [{"start_layer": int(row.start_layer), "keep_fraction": float(row.keep_fraction)}
                          for row in stages.dropna().itertuples()]
    if method == "vica":
        data["cross_attention_layers"] = st.multiselect(
            "Cross-attention layers", list(range(layers)), default=data["cross_attention_layers"], key=f"{key}_vica")
    return data


def decoder_shape(num_llm_layers: int) -> tuple[DecoderShape, str]:
    loaded = state.active_model()
    if loaded is not None and loaded.adapter.num_llm_layers == num_llm_layers:
        return DecoderShape.of_model(loaded), f"the shape of the loaded model {loaded.name!r}"
    return SMOLLM2_135M, "SmolLM2-135M's shape (load the run's model in the sidebar to use its own)"


def tokens_figure(per_layer: list[float], num_visual: int) -> go.Figure:
    figure = go.Figure(go.Bar(x=list(range(len(per_layer))), y=per_layer, name="schedule"))
    figure.add_hline(y=num_visual, line={"dash": "dash"}, annotation_text=f"baseline {num_visual}")
    figure.update_layout(title="Visual tokens in each layer's input", xaxis_title="LLM layer (0-indexed)",
                         yaxis_title="visual tokens", height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return figure


def estimate_panel(config: BaseModel) -> None:
    shape, source = decoder_shape(config.num_llm_layers)
    left, right = st.columns(2)
    num_visual = int(left.number_input("Visual tokens per image", min_value=1, value=256, step=1, key="num_visual"))
    num_text = int(right.number_input("Text tokens per prompt", min_value=1, value=32, step=1, key="num_text"))
    estimate = estimate_flops(config, shape, num_visual, num_text)
    first, second = st.columns(2)
    first.metric("average visual tokens per layer", f"{estimate.average_visual_tokens:.1f}",
                 help=f"of {num_visual}, over {config.num_llm_layers} layers")
    second.metric("estimated prefill FLOPs saving", f"{estimate.saving:.1%}",
                  help=f"decoder layers only, {estimate.schedule:.3g} vs {estimate.baseline:.3g} FLOPs; {source}")
    st.plotly_chart(tokens_figure(visual_tokens_per_layer(config, num_visual), num_visual), key="tokens_per_layer")
    st.caption(f"FLOPs estimated from {source}: projections and MLP linear in the tokens, attention quadratic.")


def save_panel(config: BaseModel, text: str) -> None:
    st.code(text, language="yaml")
    st.download_button("Download YAML", text, file_name=f"{config.method}.yaml", mime="application/x-yaml",
                       key="download")
    left, right = st.columns([3, 1])
    path = left.text_input("Save to file", value=str(Path("configs") / f"{config.method}.yaml"), key="save_path")
    if right.button("Save", key="save"):
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            load_config(target)  # what training reads must validate
        except (OSError, WorkbenchError) as error:
            st.error(f"cannot save {target}: {error}")
        else:
            st.success(f"saved {target.resolve()}; train with it by passing this file to the efficient model")


def render() -> None:
    st.title("Export a config")
    view = state.run_picker("Run", key="export_run")
    method = st.selectbox("Method", METHODS, key="export_method", format_func=lambda m: f"{m}: {METHOD_HELP[m]}")
    if view is None:
        return
    try:
        data = prefill(view.folder, method, state.folder_stamp(view.folder))
    except WorkbenchError as error:
        st.error(str(error))
        return
    key = hashlib.sha1(f"{view.folder}|{method}".encode()).hexdigest()[:8]
    edited = edit(data, key)
    config, errors = validate(edited)
    for line in errors:
        st.error(line)
    if config is None:
        return
    estimate_panel(config)
    save_panel(config, config_yaml(config))


if __name__ == "__main__":
    render()
