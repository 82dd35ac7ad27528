"""Accuracy against length: the Pareto frontier of evaluated models, as data and as a plotly figure.

A model is on the frontier when no other model is at least as accurate with responses no longer, and
strictly better in one of the two. The figure marks every model and joins the frontier's points.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (length, accuracy) points no other point dominates, shortest first."""
    def dominated(i: int) -> bool:
        length, accuracy = points[i]
        return any(other_length <= length and other_accuracy >= accuracy and (other_length, other_accuracy)
                   != (length, accuracy) for other_length, other_accuracy in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: points[i])


def accuracy_length_figure(results: Sequence[dict]) -> go.Figure:
    """pass@1 against mean response tokens, one marker per evaluated model, the frontier as a line."""
    points = [(result["mean_tokens"], result["pass@1"]) for result in results]
    frontier = pareto_frontier(points)
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[length for length, _ in points], y=[accuracy for _, accuracy in points],
                                mode="markers+text", text=[result["model"] for result in results],
                                textposition="top center", name="models"))
    figure.add_trace(go.Scatter(x=[points[i][0] for i in frontier], y=[points[i][1] for i in frontier],
                                mode="lines", name="Pareto frontier"))
    figure.update_layout(title="Reasoning test split: accuracy against length", xaxis_title="mean response tokens",
                         yaxis_title="pass@1")
    return figure
