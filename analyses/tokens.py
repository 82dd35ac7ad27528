"""`wb analyze tokens`: call every visual token sink, dead or alive, and say why.

Two rules decide on the evidence of `token_evidence`:

- `embedlens` (the reference rule): a token whose top-k nearest vocabulary ids contain the
  given ViT-sink, LLM-sink or dead anchor id gets that category; all others are alive.
- `auto` (default), for any model:
  1. anchors are discovered on the data: vocabulary ids that are among the top-k neighbours
     of many tokens (`min_share` of all) in most images (`min_coverage`), i.e. image-agnostic;
  2. sinks are tokens with outlier norms, by a robust z-score (median / MAD of log norms) above
     `z_threshold`: in the vision features (ViT sink) or in the LLM's input and early layers
     (LLM sink); a token near an anchor that also draws outlier attention is an LLM sink too;
  3. dead tokens have an anchor among their top-k and ordinary norms;
  4. everything else is alive.
  Each token's `reason` names the rule that fired with its numbers.

The rule with its discovered anchors and norm statistics is saved in `summary.json`, so the
same decisions can be applied to new images (the interventions analysis does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from analyses.runner import run_batches
from analyses.token_evidence import ANALYSIS_PROMPT, EvidenceLayers, token_evidence
from workbench.data.image_sets import ImageSet
from workbench.errors import InputError
from workbench.models.loading import LoadedModel
from workbench.store import RunStore

CATEGORIES = ("sink", "dead", "alive")
RuleKind = Literal["auto", "embedlens"]
ROBUST_SD = 1.4826  # MAD -> standard deviation for normal data


@dataclass
class Anchor:
    id: int
    token: str
    role: str  # "sink_vit", "sink_llm" or "dead"
    share: float  # fraction of all visual tokens with this id among their top-k
    coverage: float  # fraction of images where some token has it
    consistency: float  # mean pairwise cosine of the tokens whose top-1 it is (1 = identical)


@dataclass
class RobustStats:
    median: float
    mad: float

    @classmethod
    def of(cls, values: np.ndarray) -> RobustStats:
        logs = np.log(np.maximum(values, 1e-12))
        median = float(np.median(logs))
        return cls(median, float(np.median(np.abs(logs - median))))

    def z(self, values: np.ndarray) -> np.ndarray:
        return (np.log(np.maximum(values, 1e-12)) - self.median) / (ROBUST_SD * self.mad + 1e-6)


@dataclass
class TokenRule:
    """Everything needed to categorise tokens of new images the way a run did."""

    kind: RuleKind
    topk: int
    anchors: list[Anchor]
    z_threshold: float = 3.5
    stats: dict[str, RobustStats] = field(default_factory=dict)  # "vision", "llm", "attention"

    def anchor_ids(self, role: str) -> set[int]:
        return {anchor.id for anchor in self.anchors if anchor.role == role}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenRule:
        return cls(kind=data["kind"], topk=data["topk"], anchors=[Anchor(**anchor) for anchor in data["anchors"]],
                   z_threshold=data["z_threshold"],
                   stats={name: RobustStats(**value) for name, value in data["stats"].items()})

    def classify(self, evidence: pd.DataFrame) -> pd.DataFrame:
        """`category`, `sink_source`, `reason` (and the z-scores for `auto`) for each evidence row."""
        return _classify_embedlens(self, evidence) if self.kind == "embedlens" else _classify_auto(self, evidence)


def _first_anchor(topk_ids: list[int], ids: set[int]) -> int | None:
    return next((token_id for token_id in topk_ids if token_id in ids), None)


def _classify_embedlens(rule: TokenRule, evidence: pd.DataFrame) -> pd.DataFrame:
    roles = [("sink_vit", "sink", "vit"), ("sink_llm", "sink", "llm"), ("dead", "dead", "")]
    decisions = []
    for topk_ids in evidence["topk_ids"]:
        decision = ("alive", "", f"no anchor among the top-{rule.topk}")
        for role, category, source in roles:
            hit = _first_anchor(list(topk_ids)[:rule.topk], rule.anchor_ids(role))
            if hit is not None:
                decision = (category, source, f"top-{rule.topk} contains the {role} anchor {hit}")
                break
        decisions.append(decision)
    return pd.DataFrame(decisions, columns=["category", "sink_source", "reason"], index=evidence.index)


def _auto_decision(rule: TokenRule, anchor: Anchor | None, row: pd.Series, z: dict[str, float]) -> tuple[str, str, str]:
    """(category, sink source, reason) of one token under the auto rule."""
    limit = rule.z_threshold
    if z["vision"] > limit:
        return "sink", "vit", (f"vision-feature norm {row['vision_norm']:.1f} is {z['vision']:.1f} robust SDs "
                               f"above the median (limit {limit})")
    if z["llm"] > limit:
        return "sink", "llm", (f"LLM early-layer norm {row['llm_norm']:.1f} is {z['llm']:.1f} robust SDs "
                               f"above the median (limit {limit})")
    if anchor is not None and z["attention"] > limit:
        return "sink", "llm", (f"near anchor {anchor.token!r} and draws attention {z['attention']:.1f} robust SDs "
                               f"above the median")
    if anchor is not None:
        return "dead", "", (f"top-{rule.topk} contains anchor {anchor.token!r} (id {anchor.id}: near "
                            f"{anchor.share:.0%} of tokens in {anchor.coverage:.0%} of images, consistency "
                            f"{anchor.consistency:.2f}); norms ordinary")
    return "alive", "", (f"no anchor among the top-{rule.topk}; norms ordinary (vision z {z['vision']:.1f}, "
                         f"LLM z {z['llm']:.1f})")


def _classify_auto(rule: TokenRule, evidence: pd.DataFrame) -> pd.DataFrame:
    z = {name: rule.stats[name].z(evidence[column].to_numpy())
         for name, column in (("vision", "vision_norm"), ("llm", "llm_norm"), ("attention", "attention_received"))}
    anchors = {anchor.id: anchor for anchor in rule.anchors}
    decisions = []
    for i, (_, row) in enumerate(evidence.iterrows()):
        hit = _first_anchor(list(row["topk_ids"])[:rule.topk], set(anchors))
        decisions.append(_auto_decision(rule, anchors.get(hit), row, {name: float(values[i]) for name, values in z.items()}))
    decided = pd.DataFrame(decisions, columns=["category", "sink_source", "reason"], index=evidence.index)
    return decided.assign(vision_z=z["vision"], llm_z=z["llm"], attention_z=z["attention"])


# --- anchor discovery ---------------------------------------------------------------

def group_consistency(groups: dict[str, torch.Tensor]) -> dict[int, float]:
    """Mean pairwise cosine within each top-1 group, from the summed unit vectors of all batches."""
    ids = groups["group_ids"]
    unique, index = ids.unique(return_inverse=True)
    sums = torch.zeros(len(unique), groups["group_sums"].shape[1]).index_add_(0, index, groups["group_sums"])
    counts = torch.zeros(len(unique)).index_add_(0, index, groups["group_counts"].float())
    # For n unit vectors with sum S: mean pairwise cosine = (|S|^2 - n) / (n (n - 1)).
    pairwise = (sums.pow(2).sum(1) - counts) / (counts * (counts - 1)).clamp(min=1)
    return {int(token_id): float(value) if count > 1 else float("nan")
            for token_id, value, count in zip(unique, pairwise, counts)}


def discover_anchors(evidence: pd.DataFrame, consistency: dict[int, float], tokenizer, z_threshold: float,
                     min_share: float, min_coverage: float) -> tuple[list[Anchor], dict[str, RobustStats]]:
    """Image-agnostic nearest-vocabulary ids, each with the role its tokens' norms suggest."""
    stats = {name: RobustStats.of(evidence[column].to_numpy())
             for name, column in (("vision", "vision_norm"), ("llm", "llm_norm"), ("attention", "attention_received"))}
    vision_outlier = stats["vision"].z(evidence["vision_norm"].to_numpy()) > z_threshold
    llm_outlier = stats["llm"].z(evidence["llm_norm"].to_numpy()) > z_threshold
    exploded = evidence[["image_id", "topk_ids"]].assign(vision_outlier=vision_outlier, llm_outlier=llm_outlier)
    exploded = exploded.explode("topk_ids").rename(columns={"topk_ids": "id"})
    num_tokens, num_images = len(evidence), evidence["image_id"].nunique()
    per_id = exploded.groupby("id").agg(tokens=("image_id", "size"), images=("image_id", "nunique"),
                                        vision_outliers=("vision_outlier", "mean"),
                                        llm_outliers=("llm_outlier", "mean"))
    per_id = per_id[(per_id.tokens / num_tokens >= min_share) & (per_id.images / num_images >= min_coverage)]
    anchors = []
    for token_id, row in per_id.sort_values("tokens", ascending=False).iterrows():
        role = ("sink_vit" if row.vision_outliers > 0.5 else "sink_llm" if row.llm_outliers > 0.5 else "dead")
        anchors.append(Anchor(int(token_id), tokenizer.decode([int(token_id)]), role, row.tokens / num_tokens,
                              row.images / num_images, consistency.get(int(token_id), float("nan"))))
    return anchors, stats


# --- the analysis -------------------------------------------------------------------

@dataclass(frozen=True)
class TokensConfig:
    rule: RuleKind = "auto"
    anchors: tuple[int, int, int] | None = None  # ViT sink, LLM sink, dead: for the embedlens rule
    topk: int = 3
    z_threshold: float = 3.5
    min_share: float = 0.05
    min_coverage: float = 0.5
    batch_size: int = 8
    prompt: str = ANALYSIS_PROMPT

    def __post_init__(self):
        if self.rule == "embedlens" and self.anchors is None:
            raise InputError("--rule embedlens needs --anchors SINK_VIT,SINK_LLM,DEAD (three vocabulary ids)")
        if self.topk < 1:
            raise InputError(f"--topk must be at least 1 (got {self.topk})")


def summarise(table: pd.DataFrame, rule: TokenRule) -> dict:
    fractions = table["category"].value_counts(normalize=True)
    per_image_alive = table.groupby("image_id")["category"].apply(lambda c: float((c == "alive").mean()))
    summary = {
        "num_images": int(table["image_id"].nunique()),
        "num_tokens": len(table),
        "fractions": {category: float(fractions.get(category, 0.0)) for category in CATEGORIES},
        "sink_sources": {source: float((table["sink_source"] == source).mean()) for source in ("vit", "llm")},
        "alive_per_image": {"min": float(per_image_alive.min()), "median": float(per_image_alive.median()),
                            "max": float(per_image_alive.max())},
        "rule": rule.to_dict(),
    }
    if "patch_kind" in table:
        summary["category_by_patch_kind"] = {
            kind: {category: float(share) for category, share in
                   group["category"].value_counts(normalize=True).items()}
            for kind, group in table.groupby("patch_kind")}
    return summary


def analyze_tokens(loaded: LoadedModel, images: ImageSet, out: str, config: TokensConfig = TokensConfig()) -> dict:
    """Run (or resume) the tokens analysis into `out`; returns the summary also written there."""
    store = RunStore.open(out, kind="tokens", model=loaded.name, data=images.source, config=asdict(config))
    layers = EvidenceLayers.for_depth(loaded.adapter.num_llm_layers)
    evidence, groups = run_batches(
        store, images, config.batch_size, "evidence",
        lambda items, pil: token_evidence(loaded, items, pil, config.topk, layers, config.prompt),
        "token evidence")
    tokenizer = loaded.processor.tokenizer
    if config.rule == "embedlens":
        vit, llm, dead = config.anchors
        anchors = [Anchor(token_id, tokenizer.decode([token_id]), role, float("nan"), float("nan"), float("nan"))
                   for token_id, role in ((vit, "sink_vit"), (llm, "sink_llm"), (dead, "dead"))]
        rule = TokenRule("embedlens", config.topk, anchors, config.z_threshold)
    else:
        anchors, stats = discover_anchors(evidence, group_consistency(groups), tokenizer, config.z_threshold,
                                          config.min_share, config.min_coverage)
        rule = TokenRule("auto", config.topk, anchors, config.z_threshold, stats)
    table = pd.concat([evidence, rule.classify(evidence)], axis=1)
    store.write_table("tokens", table)
    summary = summarise(table, rule) | {"evidence_layers": asdict(layers),
                                        "skipped_images": store.manifest["skipped_images"]}
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.adapter.num_llm_layers)
    return summary


def token_rule(loaded: LoadedModel, images: ImageSet, run_folder: str | Path, tokens_run: str | Path | None) -> TokenRule:
    """The rule of the tokens run `tokens_run`, or of a tokens run made now in `run_folder`/tokens."""
    if tokens_run is None:
        analyze_tokens(loaded, images, str(Path(run_folder) / "tokens"))
        tokens_run = Path(run_folder) / "tokens"
    store = RunStore.load(tokens_run, kind="tokens")
    if store.manifest["model"] != loaded.name:
        raise InputError(f"tokens run {tokens_run} was made with model {store.manifest['model']!r}, "
                         f"not {loaded.name!r}")
    if store.status != "complete":
        raise InputError(f"tokens run {tokens_run} did not finish; run it again to complete it")
    return TokenRule.from_dict(store.read_json("summary")["rule"])
