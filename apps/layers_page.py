"""Page 2, layers: a similarity run's and an alignment run's curves with the recommended injection / exit
layers marked, a vision-layers run's probe and norm curves with its stages and recommended tower layers,
the attention the current image's visual tokens receive at every LLM layer, and the efficient methods' layer
curves (SkipGPT's routing, ViCA's layer choice: `apps/method_layers.py`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from apps import state
from apps.charts import alignment_figure, attention_heatmap, attention_share_figure, similarity_figure
from apps.compute import attention_by_layer
from apps.explorer import CURRENT_IMAGE_KEY, DEFAULT_PROMPT
from apps.method_layers import routing_section, vica_section
from workbench.data.images import load_image
from workbench.errors import WorkbenchError


@st.cache_resource(show_spinner=False, max_entries=8)
def _attention(_loaded, model_key: str, image_key: str, prompt: str, _image) -> tuple[np.ndarray, tuple[int, int]]:
    return attention_by_layer(_loaded, _image, prompt)


def recommendation_table(summary: dict) -> pd.DataFrame:
    """The similarity run's recommendation as rows a person reads."""
    recommendation = summary.get("recommendation", {})
    rows = [("inject visual tokens at layer", recommendation.get("injection_layer")),
            ("drop them all at layer (exit)", recommendation.get("exit_layer"))]
    rows += [(f"keep {stage['keep_fraction']:.0%} from layer", stage["start_layer"])
             for stage in recommendation.get("stages", [])]
    if recommendation.get("passive_layers"):
        rows.append(("passive layers for the text", ", ".join(map(str, recommendation["passive_layers"]))))
    return pd.DataFrame(rows, columns=["recommendation", "layer"]).astype(str)


def _stages_and_picks(figure: go.Figure, summary: dict) -> go.Figure:
    """Stages shaded in alternating bands; recommended tower layers marked."""
    for index, (first, last) in enumerate(summary.get("stages", [])):
        figure.add_vrect(x0=first - 0.5, x1=last + 0.5, fillcolor="#f4a261", opacity=0.06 + 0.1 * (index % 2),
                         line_width=0)
    for layer in summary.get("recommended_layers", []):
        base = " (base)" if layer == summary.get("base_layer") else ""
        figure.add_vline(x=layer, line_dash="dot", line_color="#2a9d8f", annotation_text=f"{layer}{base}")
    return figure


def vision_probe_figure(probes: pd.DataFrame, summary: dict) -> go.Figure:
    """Probe accuracy per tower layer, one line per target, its majority-class accuracy dashed beside it."""
    figure = go.Figure()
    for target, rows in probes.groupby("target", sort=False):
        figure.add_scatter(x=rows["layer"], y=rows["accuracy"], mode="lines+markers", name=target)
        figure.add_scatter(x=rows["layer"], y=rows["majority"], mode="lines", line_dash="dash", opacity=0.5,
                           name=f"{target} (majority)", showlegend=False)
    figure.update_layout(title="Linear probes per vision-tower layer", xaxis_title="tower layer (hidden_states index)",
                         yaxis_title="test accuracy", yaxis_range=[0, 1])
    return _stages_and_picks(figure, summary)


def vision_norm_figure(layers: pd.DataFrame, summary: dict) -> go.Figure:
    """Mean token norm per tower layer, with the share of high-norm outlier tokens on a second axis."""
    figure = go.Figure()
    figure.add_scatter(x=layers["layer"], y=layers["mean_norm"], mode="lines+markers", name="mean norm")
    figure.add_bar(x=layers["layer"], y=layers["outlier_share"], name="outlier share", yaxis="y2", opacity=0.4)
    figure.update_layout(title="Norm profile of the vision tower", xaxis_title="tower layer (hidden_states index)",
                         yaxis_title="mean token norm",
                         yaxis2={"title": "outlier share", "overlaying": "y", "side": "right", "tickformat": ".0%"})
    return _stages_and_picks(figure, summary)


def vision_section() -> None:
    st.subheader("Vision-tower layers")
    run = state.run_picker("Vision-layers run", ("vision-layers",), key="layers_vision", allow_none=True)
    if run is None or "probes" not in run.tables or "layers" not in run.tables:
        st.caption("choose a vision-layers run to see what each tower layer encodes (`wb analyze vision-layers` "
                   "makes one)")
        return
    st.plotly_chart(vision_probe_figure(run.tables["probes"], run.summary), key="vision_probe_chart")
    st.plotly_chart(vision_norm_figure(run.tables["layers"], run.summary), key="vision_norm_chart")
    st.markdown(f"Recommended tower layers: **{run.summary.get('recommended_layers')}** "
                f"(base layer {run.summary.get('base_layer')}; stages {run.summary.get('stages')})")


def attention_section() -> None:
    st.subheader("Attention received by visual tokens")
    loaded = state.active_model()
    if loaded is None:
        st.info("load a model in the sidebar to see attention per layer")
        return
    image_key, image, prompt = st.session_state.get(CURRENT_IMAGE_KEY) or (
        "sample:astronaut", load_image("sample:astronaut"), DEFAULT_PROMPT)
    st.caption(f"image **{image_key}**, prompt {prompt!r} (pick another in the image explorer): mean over heads "
               f"and over the text after the image, eager attention at every layer")
    try:
        with st.spinner("tracing attention at every layer ..."):
            received, (_rows, cols) = _attention(loaded, state.model_key(loaded), image_key, prompt, image)
    except WorkbenchError as error:
        st.error(str(error))
        return
    st.plotly_chart(attention_heatmap(received), key="attention_heatmap")
    st.plotly_chart(attention_share_figure(received), key="attention_share")
    top = np.argsort(received.mean(0))[::-1][:5]
    st.markdown("Most attended visual tokens (mean over layers): "
                + ", ".join(f"token {t} (row {t // cols}, col {t % cols})" for t in top))


def render() -> None:
    st.title("Layers")
    left, right = st.columns(2)
    with left:
        similarity = state.run_picker("Similarity run", ("similarity",), key="layers_similarity", allow_none=True)
    with right:
        alignment = state.run_picker("Alignment run", ("alignment",), key="layers_alignment", allow_none=True)
    if similarity is not None and "layers" in similarity.tables:
        st.plotly_chart(similarity_figure(similarity.tables["layers"], similarity.summary), key="similarity_chart")
        st.dataframe(recommendation_table(similarity.summary), hide_index=True)
    if alignment is not None and "layers" in alignment.tables:
        st.plotly_chart(alignment_figure(alignment.tables["layers"], alignment.summary), key="alignment_chart")
        st.markdown(f"Recommended injection layer (least separable): "
                    f"**{alignment.summary.get('recommended_injection_layer')}**")
    if similarity is None and alignment is None:
        st.info("choose a similarity or alignment run above to see its curves (`wb analyze similarity` / "
                "`wb analyze alignment` make them)")
    vision_section()
    attention_section()
    routing_section()
    vica_section()


if __name__ == "__main__":
    render()
