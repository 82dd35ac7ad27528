"""Plotly figures of run results, shared by the layers and runs pages: layer curves with the recommended
layers marked, attention heatmaps, category fractions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from apps.palette import CATEGORY_COLOURS, SEQUENTIAL

SIMILARITY_CURVES = {"visual_self_cos": "visual tokens: cos(before, after layer)",
                     "text_self_cos": "text tokens: cos(before, after layer)",
                     "vision_effect": "vision effect on text: 1 - cos(with, without image)"}
ALIGNMENT_CURVES = {"separability": "separability of alive visual vs text states (0.5 = alike)",
                    "centroid_cos": "cosine of the two centroids",
                    "log10_norm_ratio": "log10(visual norm / text norm)",
                    "logit_lens_hit": "logit-lens hit rate of object tokens"}


def _curves(layers: pd.DataFrame, names: dict[str, str], title: str) -> go.Figure:
    figure = go.Figure()
    for column, label in names.items():
        if column in layers and layers[column].notna().any():
            figure.add_trace(go.Scatter(x=layers["layer"], y=layers[column], mode="lines+markers", name=label))
    figure.update_layout(title=title, xaxis_title="LLM layer (0-indexed)", height=380,
                         margin={"l": 10, "r": 10, "t": 40, "b": 10}, legend={"orientation": "h", "y": -0.25})
    return figure


def _mark(figure: go.Figure, layer: int, text: str, colour: str) -> None:
    figure.add_vline(x=layer, line={"color": colour, "dash": "dash", "width": 2}, annotation_text=text,
                     annotation_position="top")


def similarity_figure(layers: pd.DataFrame, summary: dict) -> go.Figure:
    """The three similarity curves; injection and exit layers marked, pruning stages shaded."""
    figure = _curves(layers, SIMILARITY_CURVES, "Inter-layer similarity")
    recommendation = summary.get("recommendation", {})
    if "injection_layer" in recommendation:
        _mark(figure, recommendation["injection_layer"], f"inject {recommendation['injection_layer']}", "#2a9d8f")
    if "exit_layer" in recommendation:
        _mark(figure, recommendation["exit_layer"], f"exit {recommendation['exit_layer']}", "#e76f51")
    stages = recommendation.get("stages", [])
    ends = [stage["start_layer"] for stage in stages[1:]] + [recommendation.get("exit_layer")]
    for stage, end in zip(stages, ends):
        if end is not None:
            figure.add_vrect(x0=stage["start_layer"], x1=end, fillcolor="#f4a261",
                             opacity=0.08 + 0.25 * stage["keep_fraction"], line_width=0)
    return figure


def alignment_figure(layers: pd.DataFrame, summary: dict) -> go.Figure:
    figure = _curves(layers, ALIGNMENT_CURVES, "Layer alignment of alive visual tokens")
    if "recommended_injection_layer" in summary:
        layer = summary["recommended_injection_layer"]
        _mark(figure, layer, f"inject {layer}", "#2a9d8f")
    return figure


def attention_heatmap(received: np.ndarray, title: str = "Attention received by visual tokens") -> go.Figure:
    """[layers, visual tokens] -> heatmap (token index across, layer down), on an explicit scale (see
    `apps.palette`: a named one can lose its first colour to the theme)."""
    figure = go.Figure(go.Heatmap(z=received, colorscale=SEQUENTIAL, colorbar={"title": "attention"},
                                  hovertemplate="layer %{y}, token %{x}: %{z:.4f}<extra></extra>"))
    figure.update_layout(title=title, xaxis_title="visual token (row-major)", yaxis_title="LLM layer",
                         height=420, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    figure.update_yaxes(autorange="reversed")
    return figure


def attention_share_figure(received: np.ndarray) -> go.Figure:
    share = received.sum(1)
    figure = go.Figure(go.Bar(x=list(range(len(share))), y=share,
                              hovertemplate="layer %{x}: %{y:.1%} of text attention<extra></extra>"))
    figure.update_layout(title="Share of the text's attention that goes to the image", xaxis_title="LLM layer",
                         yaxis_tickformat=".0%", height=280, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return figure


def fractions_figure(fractions: dict[str, float], title: str = "Token categories") -> go.Figure:
    categories = [c for c in CATEGORY_COLOURS if c in fractions]
    figure = go.Figure(go.Bar(x=categories, y=[fractions[c] for c in categories],
                              marker_color=[CATEGORY_COLOURS[c] for c in categories],
                              text=[f"{fractions[c]:.1%}" for c in categories], textposition="auto"))
    figure.update_layout(title=title, yaxis_tickformat=".0%", height=280, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return figure
