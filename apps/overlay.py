"""The image explorer's figure: the image as the model saw it, each patch coloured by its token's category
(or by a number such as its norm), with hover text naming the token's evidence. One square marker per
patch, centred on (col, row), so a click selects a patch and reports its row and column. Each category is
one trace with a see-through fill and an opaque outline (colours: `apps.palette`); a click on its legend
entry hides or shows it.
"""

from __future__ import annotations

import base64
import io

import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from apps.palette import CATEGORY_COLOURS, OUTLINE, SEQUENTIAL, translucent

NUMERIC_COLOURS = {"input_norm": "input norm", "llm_norm": "LLM early-layer norm",
                   "vision_norm": "vision-feature norm", "attention_received": "attention received"}
FIGURE_WIDTH = 560  # px; patches are drawn as markers whose size is fixed in pixels
MARGIN = 8
MARKER_SHARE = 0.88  # of a patch's width: the gap between outlined squares lets the photo show through


def image_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _truth(row: pd.Series) -> str:
    kind = row.get("patch_kind")
    if not isinstance(kind, str) or not kind:
        return ""
    parts = [kind] + [str(row[name]) for name in ("patch_colour", "patch_shape", "patch_char")
                      if isinstance(row.get(name), str) and row.get(name)]
    coverage = row.get("patch_coverage")
    covered = f" ({coverage:.0%} covered)" if isinstance(coverage, float) and kind != "background" else ""
    return "<br>ground truth: " + " ".join(parts) + covered


def hover_text(tokens: pd.DataFrame) -> list[str]:
    """One hover label per token: position, category, nearest vocabulary tokens, norms, evidence, reason."""
    texts = []
    for _, row in tokens.iterrows():
        neighbours = ", ".join(f"{token!r} {cos:.2f}" for token, cos in zip(row["topk_tokens"], row["topk_cos"]))
        source = f" ({row['sink_source']})" if row.get("sink_source") else ""
        texts.append(
            f"<b>token {row['token']}</b> (row {row['row']}, col {row['col']}): <b>{row['category']}</b>{source}"
            f"<br>nearest: {neighbours}"
            f"<br>norms: input {row['input_norm']:.1f}, vision {row['vision_norm']:.1f}, LLM {row['llm_norm']:.1f}"
            f"<br>attention received {row['attention_received']:.4f}"
            f"<br>{row['reason']}" + _truth(row))
    return texts


def overlay_figure(image: Image.Image, tokens: pd.DataFrame, rows: int, cols: int, colour_by: str = "category",
                   opacity: float = 0.45, selected: int | None = None, width: int = FIGURE_WIDTH) -> go.Figure:
    """The overlay (see the module docstring); `selected` (a token index) gets a frame."""
    plot_width = width - 2 * MARGIN
    patch = plot_width / cols
    height = round(patch * rows) + 2 * MARGIN
    dx, dy = cols / image.width, rows / image.height
    figure = go.Figure(go.Image(source=image_uri(image), x0=-0.5 + dx / 2, y0=-0.5 + dy / 2, dx=dx, dy=dy,
                                hoverinfo="skip", name="image"))
    texts = pd.Series(hover_text(tokens), index=tokens.index)
    marker = {"symbol": "square", "size": patch * MARKER_SHARE}
    if colour_by == "category":
        for category, colour in CATEGORY_COLOURS.items():
            part = tokens[tokens["category"] == category]
            figure.add_trace(go.Scatter(
                x=part["col"], y=part["row"], mode="markers", name=f"{category} ({len(part)})",
                marker=marker | {"color": translucent(colour, opacity), "line": {"color": OUTLINE, "width": 1.5}},
                customdata=part["token"], hovertext=texts[part.index], hoverinfo="text"))
    else:
        figure.add_trace(go.Scatter(
            x=tokens["col"], y=tokens["row"], mode="markers", name=NUMERIC_COLOURS.get(colour_by, colour_by),
            marker=marker | {"color": tokens[colour_by], "colorscale": SEQUENTIAL, "opacity": opacity,
                             "line": {"width": 0}, "showscale": True,
                             "colorbar": {"title": NUMERIC_COLOURS.get(colour_by, colour_by), "thickness": 12}},
            customdata=tokens["token"], hovertext=texts, hoverinfo="text"))
    if selected is not None:
        row, col = divmod(int(selected), cols)
        figure.add_shape(type="rect", x0=col - 0.5, x1=col + 0.5, y0=row - 0.5, y1=row + 0.5,
                         line={"color": "#ffd400", "width": 3})
    figure.update_xaxes(range=[-0.5, cols - 0.5], visible=False, fixedrange=True)
    figure.update_yaxes(range=[rows - 0.5, -0.5], visible=False, fixedrange=True, scaleanchor="x")
    figure.update_layout(width=width, height=height, margin={"l": MARGIN, "r": MARGIN, "t": MARGIN, "b": MARGIN},
                         clickmode="event+select", dragmode=False, showlegend=colour_by == "category",
                         legend={"orientation": "h", "yanchor": "top", "y": -0.01, "x": 0}, hoverlabel={"align": "left"})
    return figure


def selected_token(selection: object, cols: int) -> int | None:
    """The token a plotly selection event picked (its first point), from the point's (x, y) = (col, row)."""
    points = []
    if selection is not None:
        inner = selection.get("selection", {}) if hasattr(selection, "get") else getattr(selection, "selection", {})
        points = inner.get("points", []) if hasattr(inner, "get") else []
    for point in points:
        if "x" in point and "y" in point:
            return round(point["y"]) * cols + round(point["x"])
    return None


def logit_lens_figure(lens: pd.DataFrame, layer: int) -> go.Figure:
    """The token's norm through the layers, the chosen layer marked, its top tokens in the hover text."""
    hover = [f"layer {row.layer}: norm {row.norm:.1f}<br>"
             + "<br>".join(f"{token!r} {prob:.3f}" for token, prob in zip(row.top_tokens, row.top_probs))
             for row in lens.itertuples()]
    figure = go.Figure(go.Scatter(x=lens["layer"], y=lens["norm"], mode="lines+markers", hovertext=hover,
                                  hoverinfo="text", name="norm"))
    here = lens[lens["layer"] == layer]
    figure.add_trace(go.Scatter(x=here["layer"], y=here["norm"], mode="markers", name=f"layer {layer}",
                                marker={"size": 14, "color": "#ffd400", "line": {"width": 1, "color": "black"}},
                                hoverinfo="skip"))
    figure.update_layout(height=260, margin={"l": 10, "r": 10, "t": 30, "b": 10}, showlegend=False,
                         title="norm of the token's hidden state after each LLM layer",
                         xaxis_title="layer (0-indexed)", yaxis_title="norm")
    return figure
