"""Page 3, runs: open any run folder of the run store and see what it found (category fractions, probe
accuracies, the intervention table, layer curves); compare two runs side by side; start a new batch
analysis in the background and watch its progress.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from apps import state
from apps.charts import alignment_figure, fractions_figure, similarity_figure
from apps.jobs import ANALYSES, analyze_command, job_status, log_path, start_job
from apps.layers_page import recommendation_table
from apps.rule_label import rule_caption, run_rule_source
from apps.run_root import inside_root, path_under_root, run_root
from apps.state import RunView
from workbench.errors import InputError

JOBS_KEY = "jobs"


def headline(view: RunView) -> dict[str, float]:
    """A run's comparable numbers, by kind: what the side-by-side table lines up."""
    summary = view.summary
    numbers: dict[str, float] = {}
    if view.kind == "tokens":
        numbers |= {f"fraction {c}": v for c, v in summary.get("fractions", {}).items()}
        numbers |= {f"group fraction {c}": v for c, v in summary.get("group_fractions", {}).items()}
        numbers |= {f"alive per image, {k}": v for k, v in summary.get("alive_per_image", {}).items()}
    elif view.kind == "probe":
        for condition, accuracy in ((summary.get("vqa") or {}).get("accuracy") or {}).items():
            numbers[f"VQA: {condition}"] = accuracy["overall"]
        if "probes" in view.tables:
            probes = view.tables["probes"]
            for row in probes[probes["category"] == "all"].itertuples():
                numbers[f"probe {row.target} @ {row.layer}"] = row.accuracy
    elif view.kind == "interventions":
        numbers |= {f"VQA: {name}": value for name, value in summary.get("accuracy", {}).items()}
    elif view.kind == "similarity":
        recommendation = summary.get("recommendation", {})
        numbers |= {"injection layer": recommendation.get("injection_layer"),
                    "exit layer": recommendation.get("exit_layer"),
                    "peak vision effect": recommendation.get("peak_vision_effect")}
    elif view.kind == "alignment":
        numbers |= {key.replace("_", " "): summary.get(key) for key in
                    ("recommended_injection_layer", "separability_at_recommended", "separability_at_0")}
    return {name: value for name, value in numbers.items() if value is not None}


def compare_table(first: RunView, second: RunView) -> pd.DataFrame:
    """Headline numbers of two runs in one table, with B - A where both have the number."""
    a, b = headline(first), headline(second)
    names = list(dict.fromkeys([*a, *b]))
    table = pd.DataFrame({"measure": names,
                          "A": pd.to_numeric(pd.Series([a.get(n) for n in names], dtype=object), errors="coerce"),
                          "B": pd.to_numeric(pd.Series([b.get(n) for n in names], dtype=object), errors="coerce")})
    table["B - A"] = table["B"] - table["A"]
    return table


def probe_pivot(probes: pd.DataFrame) -> pd.DataFrame:
    """Probe accuracy per (target, layer) across token categories, with the majority baseline of 'all'."""
    pivot = probes.pivot_table(index=["target", "layer"], columns="category", values="accuracy")
    majority = probes[probes["category"] == "all"].set_index(["target", "layer"])["majority_accuracy"]
    pivot["majority (all)"] = majority
    ordered = [c for c in ("all", "alive", "dead", "sink", "majority (all)") if c in pivot]
    return pivot[ordered].reset_index()


def show_run(view: RunView, key: str) -> None:
    manifest = view.manifest
    st.markdown(f"**{view.kind}** run · model `{manifest.get('model')}` · data `{manifest.get('data')}` · "
                f"status **{manifest.get('status')}**")
    st.caption(f"{view.folder} · started {manifest.get('started', '?')} · finished {manifest.get('finished', '-')}")
    if manifest.get("skipped_images"):
        st.warning(f"{len(manifest['skipped_images'])} images were unreadable and skipped")
    summary = view.summary
    if view.kind == "tokens" and "fractions" in summary:
        st.plotly_chart(fractions_figure(summary["fractions"], f"Token categories over {summary.get('num_images')} "
                                                                f"images"), key=f"{key}_fractions")
        st.caption(rule_caption(summary.get("rule", {}), run_rule_source(manifest, summary)))
        anchors = pd.DataFrame(summary.get("rule", {}).get("anchors", []))
        if len(anchors):
            st.markdown("**Anchors** (image-agnostic nearest vocabulary tokens)")
            st.dataframe(anchors, hide_index=True)
        if summary.get("category_by_patch_kind"):
            st.markdown("**Category by what covers the patch** (probe scenes)")
            st.dataframe(pd.DataFrame(summary["category_by_patch_kind"]).T.fillna(0).style.format("{:.1%}"))
    elif view.kind == "probe":
        vqa = summary.get("vqa")
        if vqa:
            st.markdown(f"**VQA accuracy** on {vqa['questions']} {vqa['split']} questions "
                        f"(alive fraction {vqa['alive_fraction']:.1%})")
            st.dataframe(pd.DataFrame([{"condition": name} | acc for name, acc in vqa["accuracy"].items()]),
                         hide_index=True)
        if "probes" in view.tables:
            st.markdown("**Linear-probe accuracy** per target, layer and token category")
            st.dataframe(probe_pivot(view.tables["probes"]), hide_index=True)
    elif view.kind == "interventions" and "conditions" in view.tables:
        st.markdown("**VQA accuracy under each intervention**")
        st.dataframe(view.tables["conditions"], hide_index=True)
    elif view.kind == "similarity" and "layers" in view.tables:
        st.plotly_chart(similarity_figure(view.tables["layers"], summary), key=f"{key}_similarity")
        st.dataframe(recommendation_table(summary), hide_index=True)
    elif view.kind == "alignment" and "layers" in view.tables:
        st.plotly_chart(alignment_figure(view.tables["layers"], summary), key=f"{key}_alignment")
    with st.expander("summary.json"):
        st.json(summary)


@st.fragment(run_every=2)
def jobs_panel() -> None:
    for job in reversed(st.session_state.get(JOBS_KEY, [])):
        status = job_status(job.returncode, job.log_text())
        st.markdown(f"`{' '.join(job.argv[3:])}`: **{status.label}**, {time.time() - job.started:.0f} s")
        if status.fraction is not None:
            st.progress(status.fraction)
        st.caption(f"log `{job.log}`" + (f": {status.last_line[-300:]}" if status.last_line else ""))


def job_paths(root: Path, kind: str) -> tuple[Path, Path] | None:
    """The run-name box; the run folder it names under `root` and the job's log, or None (with the one-line
    reason shown)."""
    stamp = st.session_state.setdefault("job_stamp", time.strftime("%m%d-%H%M"))
    name = st.text_input("Run name", value=f"{kind}-{stamp}", key="job_name",
                         help=f"a folder under the run root {root}; the job's log is NAME.log beside it")
    try:
        out = path_under_root(root, name)
        log = inside_root(root, log_path(out))  # checked on its own: a symlink there would lead elsewhere
    except InputError as error:
        st.error(str(error))
        return None
    st.caption(f"writes `{out}`, log `{log}`")
    return out, log


def new_job_form() -> None:
    with st.expander("Start a batch analysis (runs in the background)"):
        kind = st.selectbox("Analysis", ANALYSES, key="job_kind")
        images = st.text_input("Images", value="probe:16", key="job_images",
                               help="probe:N (validation scenes), probe:SPLIT:N, samples, or a folder")
        paths = job_paths(run_root(), kind)
        model = st.session_state.get(state.ACTIVE_MODEL_KEY) or "default"
        jobs = st.session_state.setdefault(JOBS_KEY, [])
        clicked = st.button(f"Run `wb analyze {kind}` on model {model}", key="job_start", disabled=paths is None)
        if clicked and paths is not None:  # a client can send a click on a disabled button
            out, log = paths
            if any(job.running and job.out == out for job in jobs):
                st.error(f"a job is already writing {out}: wait for it to end or choose another name")
            else:
                jobs.append(start_job(analyze_command(kind, model, images, out), log, out))
                del st.session_state["job_stamp"]  # the next job gets a new folder
        if jobs:
            jobs_panel()


def render() -> None:
    st.title("Runs")
    st.caption(f"Run folders under the run root `{state.runs_root()}` (`wb app --runs-dir` sets it), or type a path.")
    left, right = st.columns(2)
    with left:
        first = state.run_picker("Run A", key="run_a")
    with right:
        second = state.run_picker("Run B (compare)", key="run_b", allow_none=True, start_empty=True)
    if first is not None and second is not None:
        st.subheader("A vs B")
        st.dataframe(compare_table(first, second), hide_index=True)
    if first is not None:
        with left:
            show_run(first, "a")
    if second is not None:
        with right:
            show_run(second, "b")
    new_job_form()


if __name__ == "__main__":
    render()
