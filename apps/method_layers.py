"""The Layers page's curves of two efficient methods: where a SkipGPT run's routers skip (a `wb analyze routing`
run), and what cutting text->visual attention at one layer costs, which picks ViCA's layers (a `wb analyze
vica-layers` run)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from apps import state

MODULES = ("attention", "mlp")


def _skip_shares(routing: pd.DataFrame, by: str) -> dict[str, pd.Series]:
    """Per module, the share of real tokens that skip it, grouped by `by` (a column of the routing table)."""
    sums = routing.groupby(["module", by])[["tokens", "ran"]].sum()
    return {module: 1 - sums.loc[module, "ran"] / sums.loc[module, "tokens"] for module in MODULES}


def routing_figure(routing: pd.DataFrame, by: str = "layer", bins: int = 8) -> go.Figure:
    """Share skipped, attention against MLP, per decoder layer (`by="layer"`) or per bin of token position."""
    if by == "position":
        routing = routing.assign(position=routing["position"] * bins // (routing["position"].max() + 1))
    figure = go.Figure()
    for module, shares in _skip_shares(routing, by).items():
        figure.add_scatter(x=shares.index, y=shares.values, mode="lines+markers", name=module)
    figure.update_layout(title=f"Where the routers skip, by {'decoder layer' if by == 'layer' else 'token position'}",
                         xaxis_title="decoder layer" if by == "layer" else f"token position ({bins} equal bins)",
                         yaxis_title="share of real tokens that skip", yaxis_range=[0, 1], yaxis_tickformat=".0%")
    return figure


def vica_layers_figure(layers: pd.DataFrame, chosen: list[int]) -> go.Figure:
    """The answer-loss increase when text->visual attention is cut at each layer (bars, chosen layers darker), with
    the attention mass the text puts on the visual tokens there (a proxy) on a second axis."""
    figure = go.Figure()
    figure.add_bar(x=layers["layer"], y=layers["loss_increase"], name="loss increase when cut",
                   marker_color=["#264653" if layer in chosen else "#a8c5d1" for layer in layers["layer"]])
    figure.add_scatter(x=layers["layer"], y=layers["attention_mass"], mode="lines+markers", yaxis="y2",
                       name="attention mass on visual tokens")
    figure.update_layout(title="Cutting text->visual attention at one layer (darker: the layers chosen for ViCA)",
                         xaxis_title="decoder layer", yaxis_title="answer loss increase",
                         yaxis2={"title": "attention mass", "overlaying": "y", "side": "right"})
    return figure


def routing_section() -> None:
    st.subheader("SkipGPT routing")
    run = state.run_picker("Routing run", ("routing",), key="layers_routing", allow_none=True)
    if run is None or "routing" not in run.tables:
        st.caption("choose a routing run to see which layers and tokens skip attention and the MLP "
                   "(`wb analyze routing --run RUN` makes one from a `wb train skipgpt` run)")
        return
    st.plotly_chart(routing_figure(run.tables["routing"], "layer"), key="routing_layer_chart")
    st.plotly_chart(routing_figure(run.tables["routing"], "position"), key="routing_position_chart")
    summary = run.summary
    st.markdown(f"Skipped: attention **{summary.get('attention_skipped', 0):.1%}**, MLP "
                f"**{summary.get('mlp_skipped', 0):.1%}** (target {summary.get('target_sparsity')}); attention "
                f"{'is' if summary.get('attention_more_redundant_than_mlp') else 'is not'} the more redundant, "
                f"as SkipGPT reports it is.")


def vica_section() -> None:
    st.subheader("ViCA layer choice")
    run = state.run_picker("ViCA-layers run", ("vica-layers",), key="layers_vica", allow_none=True)
    if run is None or "layers" not in run.tables:
        st.caption("choose a vica-layers run to see which layers' text->visual attention the answers need "
                   "(`wb analyze vica-layers` makes one; `wb export-config --method vica` reads it)")
        return
    chosen = run.summary.get("chosen", {})
    picked = chosen.get("8") or next(iter(chosen.values()), [])
    st.plotly_chart(vica_layers_figure(run.tables["layers"], picked), key="vica_layers_chart")
    if "agreement" in run.tables:
        st.dataframe(run.tables["agreement"], hide_index=True)
