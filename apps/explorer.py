"""Page 1, the image explorer: pick a sample photo, a probe scene or an upload, ask a question, and see
the answer and every patch coloured by its visual token's category; click a patch for its evidence and
its logit-lens reading through the LLM layers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd
import streamlit as st
from PIL import Image

from apps import state
from apps.compute import ImageReport, logit_lens
from apps.overlay import NUMERIC_COLOURS, logit_lens_figure, overlay_figure, selected_token
from apps.uploads import image_from_upload
from workbench.data.image_sets import ImageItem
from workbench.data.images import load_image, sample_names
from workbench.data.probe_scenes import SPLITS, generate_scene, scene_seed
from workbench.errors import WorkbenchError

SOURCES = ("sample photo", "probe scene", "upload")
DEFAULT_PROMPT = "Describe the image."
CURRENT_IMAGE_KEY = "current_image"  # read by the layers page
ROW_KEY, COL_KEY, LAYER_KEY, CHART_KEY = "token_row", "token_col", "lens_layer", "overlay"


@dataclass
class PickedImage:
    key: str  # names the image for caches: "sample:NAME", "probe:SPLIT:I" or "upload:HASH"
    image: Image.Image
    item: ImageItem  # with the scene (ground truth) for probe scenes


def probe_item(split: str, index: int) -> ImageItem:
    seed = scene_seed(split, index)
    return ImageItem(f"probe:{split}:{index}", lambda: generate_scene(seed).image.convert("RGB"),
                     lambda: generate_scene(seed))


def picked_upload(name: str, data: bytes) -> PickedImage:
    """An uploaded file as a picked image; raises `InputError` (one line) for anything unusable."""
    image = image_from_upload(name, data)
    return PickedImage(f"upload:{hashlib.sha1(data).hexdigest()[:16]}", image, ImageItem(name, lambda: image))


def pick_image() -> PickedImage | None:
    """The image widgets; None (with an error shown) when the chosen upload cannot be used."""
    source = st.radio("Image", SOURCES, horizontal=True, key="source")
    if source == "sample photo":
        name = st.selectbox("Sample photo", sample_names(), index=sample_names().index("astronaut"), key="sample")
        return PickedImage(f"sample:{name}", load_image(f"sample:{name}"),
                           ImageItem(f"sample:{name}", lambda: load_image(f"sample:{name}")))
    if source == "probe scene":
        left, right = st.columns(2)
        split = left.selectbox("Split", SPLITS, index=SPLITS.index("test"), key="probe_split")
        index = right.number_input("Scene", min_value=0, max_value=100_000, value=0, step=1, key="probe_index")
        item = probe_item(split, int(index))
        return PickedImage(item.id, item.load(), item)
    upload = st.file_uploader("Upload an image (PNG, JPEG, ...)", key="upload")
    if upload is None:
        st.info("choose an image file to upload")
        return None
    try:
        return picked_upload(upload.name, upload.getvalue())
    except WorkbenchError as error:
        st.error(str(error))
        return None


def _on_select() -> None:
    """Chart click -> the selected row / column boxes (runs before the page, so widgets can be set)."""
    token = selected_token(st.session_state.get(CHART_KEY), st.session_state.get("_grid_cols", 1))
    if token is not None:
        cols = st.session_state.get("_grid_cols", 1)
        st.session_state[ROW_KEY], st.session_state[COL_KEY] = divmod(token, cols)


def _default_token(report: ImageReport) -> int:
    """Start on the first sink (the most telling token) if there is one."""
    sinks = report.tokens.index[report.tokens["category"] == "sink"]
    return int(report.tokens.loc[sinks[0], "token"]) if len(sinks) else 0


def select_token(report: ImageReport) -> int:
    """Row / column boxes (a click on the overlay fills them); returns the token index."""
    if ROW_KEY not in st.session_state:
        st.session_state[ROW_KEY], st.session_state[COL_KEY] = divmod(_default_token(report), report.cols)
    st.session_state[ROW_KEY] = min(st.session_state[ROW_KEY], report.rows - 1)
    st.session_state[COL_KEY] = min(st.session_state[COL_KEY], report.cols - 1)
    left, right = st.columns(2)
    row = left.number_input("Row", min_value=0, max_value=report.rows - 1, step=1, key=ROW_KEY)
    col = right.number_input("Column", min_value=0, max_value=report.cols - 1, step=1, key=COL_KEY)
    return int(row) * report.cols + int(col)


def token_details(report: ImageReport, token: int) -> None:
    row = report.tokens.iloc[token]
    source = f" ({row['sink_source']} sink)" if row.get("sink_source") else ""
    st.markdown(f"#### Token {token} · row {row['row']}, col {row['col']}: **{row['category']}**{source}")
    st.caption(row["reason"])
    neighbours = pd.DataFrame({"nearest vocabulary token": [repr(t) for t in row["topk_tokens"]],
                               "cosine": row["topk_cos"]})
    st.dataframe(neighbours, hide_index=True)
    evidence = {"input norm": row["input_norm"], "vision-feature norm": row["vision_norm"],
                "LLM early-layer norm": row["llm_norm"], "attention received": row["attention_received"]}
    for name in ("vision_z", "llm_z", "attention_z"):
        if name in row:
            evidence[name.replace("_", " ") + "-score"] = row[name]
    st.dataframe(pd.DataFrame({"evidence": list(evidence), "value": [f"{v:.4g}" for v in evidence.values()]}),
                 hide_index=True)
    kind = row.get("patch_kind")
    if isinstance(kind, str) and kind:
        truth = {name.removeprefix("patch_"): row[name] for name in
                 ("patch_kind", "patch_shape", "patch_colour", "patch_char", "patch_coverage") if name in row}
        st.markdown("**Ground truth of this patch:** " + ", ".join(f"{k} {v}" for k, v in truth.items() if v != ""))


@st.cache_data(show_spinner=False, max_entries=64)
def _lens(_report: ImageReport, _loaded, key: str, token: int) -> pd.DataFrame:
    return logit_lens(_loaded, _report.hidden[:, token])


def lens_panel(loaded, report: ImageReport, key: str, token: int) -> None:
    lens = _lens(report, loaded, key, token)
    if st.session_state.get(LAYER_KEY, 0) >= report.num_layers:  # a model with fewer layers was chosen
        del st.session_state[LAYER_KEY]
    layer = st.slider("LLM layer (0-indexed, state after the layer)", 0, report.num_layers - 1,
                      key=LAYER_KEY, value=report.num_layers // 2)
    here = lens.iloc[layer]
    st.markdown(f"**Logit lens after layer {layer}** (final norm + LM head): norm {here['norm']:.1f}")
    st.dataframe(pd.DataFrame({"token": [repr(t) for t in here["top_tokens"]], "probability": here["top_probs"]}),
                 hide_index=True)
    st.plotly_chart(logit_lens_figure(lens, layer), key="lens_chart")


def render() -> None:
    st.title("Image explorer")
    loaded = state.active_model()
    if loaded is None:
        st.warning("No model is loaded: choose one in the sidebar.")
        return
    picked = pick_image()
    prompt = st.text_input("Prompt", value=DEFAULT_PROMPT, key="prompt").strip() or DEFAULT_PROMPT
    if picked is None:
        return
    st.session_state[CURRENT_IMAGE_KEY] = (picked.key, picked.image, prompt)
    try:
        label_rule = state.rule_for(loaded)
        with st.spinner("tracing the model and generating its answer ..."):
            key = state.model_key(loaded)
            report = state.get_report(loaded, label_rule.rule, key, picked.key, prompt, picked.image, picked.item)
    except WorkbenchError as error:
        st.error(str(error))
        return
    st.markdown(f"**Answer:** {report.answer or '(empty)'}")
    fractions = report.fractions()
    for column, category in zip(st.columns(3), fractions):
        column.metric(category, f"{fractions[category]:.0%}", help=f"share of the {len(report.tokens)} visual tokens")
    st.caption(label_rule.caption)
    left, right = st.columns([3, 2])
    with left:
        colour_by = st.selectbox("Colour patches by", ["category", *NUMERIC_COLOURS], key="colour_by",
                                 format_func=lambda name: NUMERIC_COLOURS.get(name, name))
        opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
    with right:
        token = select_token(report)
    st.session_state["_grid_cols"] = report.cols
    with left:
        figure = overlay_figure(report.view, report.tokens, report.rows, report.cols, colour_by, opacity, token)
        st.plotly_chart(figure, key=CHART_KEY, on_select=_on_select, selection_mode="points", width="content",
                        config={"displayModeBar": False})
        st.caption("Hover a patch for its evidence; click it to select it.")
    with right:
        token_details(report, token)
    lens_panel(loaded, report, key + picked.key + prompt, token)
    with st.expander("All visual tokens"):
        columns = [c for c in report.tokens.columns if c not in ("topk_ids",)]
        st.dataframe(report.tokens[columns], hide_index=True)


if __name__ == "__main__":
    render()
