"""`wb analyze report RUN...`: a finished run's headline numbers as Markdown (for notes and docs).

One function per run kind turns its summary and tables into a few Markdown tables; `report`
picks by the manifest's kind.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from workbench.store import RunStore


def _table(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    def cell(value) -> str:
        return floats.format(value) if isinstance(value, float) else str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _tokens(store: RunStore) -> str:
    summary = store.read_json("summary")
    exclusive = summary["fractions"]
    counted = {"exclusive categories": exclusive}
    if "group_fractions" in summary:  # runs before the reference groups were reported have none
        counted["reference groups"] = {category: summary["group_fractions"][category] for category in exclusive}
    fractions = pd.DataFrame([{"counted as": name} | shares | {"images": summary["num_images"],
                                                                "tokens": summary["num_tokens"]}
                              for name, shares in counted.items()])
    anchors = pd.DataFrame(summary["rule"]["anchors"])
    parts = [_table(fractions, "{:.1%}")]
    if len(anchors):
        parts.append(_table(anchors[["id", "token", "role", "share", "coverage", "consistency"]]))
    by_kind = summary.get("category_by_patch_kind")
    if by_kind:
        parts.append(_table(pd.DataFrame(by_kind).T.fillna(0.0).reset_index(names="patch kind"), "{:.1%}"))
    return "\n\n".join(parts)


def _probe(store: RunStore) -> str:
    probes = store.read_table("probes")
    pivot = probes.pivot_table(index=["target", "category"], columns="layer", values="accuracy")
    depth = {name: -1 if name == "input" else int(name.removeprefix("layer")) for name in pivot.columns}
    pivot = pivot[sorted(pivot.columns, key=depth.get)].reset_index()
    majority = probes[probes["category"] == "all"].groupby("target")["majority_accuracy"].first()
    parts = [_table(pivot, "{:.1%}"), _table(majority.reset_index(), "{:.1%}")]
    vqa = store.read_json("summary").get("vqa")
    if vqa:
        accuracy = pd.DataFrame([{"condition": name} | values for name, values in vqa["accuracy"].items()])
        parts.append(f"{vqa['questions']} {vqa['split']} questions, alive fraction {vqa['alive_fraction']:.1%}")
        parts.append(_table(accuracy, "{:.1%}"))
    return "\n\n".join(parts)


def _layers(store: RunStore) -> str:
    summary = store.read_json("summary")
    recommendation = summary.get("recommendation", {k: v for k, v in summary.items() if "layer" in k or "separ" in k})
    return "\n\n".join([_table(store.read_table("layers")), "```\n" + str(recommendation) + "\n```"])


def _interventions(store: RunStore) -> str:
    return _table(store.read_table("conditions"), "{:.1%}")


REPORTERS: dict[str, Callable[[RunStore], str]] = {
    "tokens": _tokens, "probe": _probe, "alignment": _layers, "similarity": _layers, "interventions": _interventions,
}


def report(folder: str) -> str:
    store = RunStore.load(folder)
    manifest = store.manifest
    title = f"### {manifest['kind']}: {manifest['model']} on {manifest['data']} ({folder})"
    return title + "\n\n" + REPORTERS[manifest["kind"]](store)
