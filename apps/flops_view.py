"""The export page's cost view: a config's visual tokens per layer and its counted FLOPs against dense.

Every count comes from the method's registered FLOPs count (`efficient_models.registry`), on the loaded
model's shapes when its depth fits the config, else on the default model's: prefill, a decode step and a
training step, split by part, beside the same counts with every visual token in every layer.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from apps import state
from efficient_models.registry import count_flops
from workbench.configs import MethodConfig
from workbench.flops import DEFAULT_MODEL_SHAPES, FlopsCount, ModelShapes, token_schedule_flops

PARTS = ("vision", "projector", "llm", "lm_head")


def model_shapes(num_llm_layers: int | None) -> tuple[ModelShapes, str]:
    loaded = state.active_model()
    if loaded is not None and loaded.adapter.num_llm_layers == num_llm_layers:
        return ModelShapes.of_model(loaded), f"the shapes of the loaded model {loaded.name!r}"
    return DEFAULT_MODEL_SHAPES, "the default model's shapes (load the config's model in the sidebar to use its own)"


def dense_count(shapes: ModelShapes, text_tokens: int) -> FlopsCount:
    return token_schedule_flops(shapes, text_tokens, [shapes.visual_tokens_per_image] * shapes.num_llm_layers)


def parts_table(count: FlopsCount, dense: FlopsCount) -> pd.DataFrame:
    """GFLOPs by part of prefill, one decode step and one training step, and each total's share of dense."""
    rows = []
    for stage in ("prefill", "decode", "training_step"):
        mine, reference = getattr(count, stage), getattr(dense, stage)
        rows.append({"stage": stage.replace("_", " "), **{part: getattr(mine, part) / 1e9 for part in PARTS},
                     "total": mine.total / 1e9, "vs dense": mine.total / reference.total})
    return pd.DataFrame(rows)


def tokens_figure(per_layer: list[float], num_visual: int) -> go.Figure:
    figure = go.Figure(go.Bar(x=list(range(len(per_layer))), y=per_layer, name="config"))
    figure.add_hline(y=num_visual, line={"dash": "dash"}, annotation_text=f"dense {num_visual}")
    figure.update_layout(title="Visual tokens in each layer's input", xaxis_title="LLM layer (0-indexed)",
                         yaxis_title="visual tokens", height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return figure


def cost_panel(config: MethodConfig) -> None:
    shapes, source = model_shapes(getattr(config, "num_llm_layers", None))
    left, right = st.columns(2)
    num_visual = int(left.number_input("Visual tokens per image", min_value=1, value=shapes.visual_tokens_per_image,
                                       step=1, key="num_visual"))
    num_text = int(right.number_input("Text tokens per prompt", min_value=1, value=32, step=1, key="num_text"))
    shapes = dataclasses.replace(shapes, visual_tokens_per_image=num_visual)
    count, dense = count_flops(config, shapes, num_text), dense_count(shapes, num_text)
    first, second = st.columns(2)
    first.metric("average visual tokens per layer", f"{count.average_visual_tokens:.1f}",
                 help=f"of {num_visual}, over {shapes.num_llm_layers} layers")
    second.metric("prefill FLOPs saving", f"{1 - count.prefill.total / dense.prefill.total:.1%}",
                  help=f"vision tower, projector, LLM and LM head: {count.prefill.total:.3g} vs "
                       f"{dense.prefill.total:.3g} FLOPs; {source}")
    st.plotly_chart(tokens_figure(count.visual_tokens_per_layer, num_visual), key="tokens_per_layer")
    st.dataframe(parts_table(count, dense), hide_index=True, key="flops_parts")
    st.caption(f"Counted from {source}: GFLOPs by part for one prompt with one image (decode: one step; training "
               "step: forward and backward over a frozen vision tower).")
