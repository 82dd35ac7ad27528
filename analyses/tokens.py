"""`wb analyze tokens`: call every visual token sink, dead or alive, and say why.

Two rules decide on the evidence of `token_evidence`:

- `embedlens` (the reference rule): a token whose top-k nearest vocabulary ids contain one of the
  given ViT-sink, LLM-sink or dead anchor ids gets that category; all others are alive.
- `auto` (default), for any model:
  1. anchors are discovered on the data: vocabulary ids that are among the top-k neighbours
     of many tokens (`min_share` of all) in most images (`min_coverage`), i.e. image-agnostic;
  2. sinks are outliers by a robust z-score (median / MAD of logs) above `z_threshold` -- of the
     vision-feature norm (ViT sink), or of both the norm and the massive-activation peak (largest
     coordinate / RMS) in the LLM's input and early layers (LLM sink) -- that are also
     image-agnostic: within `sink_consistency` (cosine) of a direction that such outliers take in
     at least `min_coverage` of the images. Outliers that differ from image to image are alive (in
     a trained model, tokens of objects and text can carry massive activations too); a token near
     an anchor that also draws outlier attention is an LLM sink;
  3. dead tokens have an anchor among their top-k and are typical of the data: their cosine to
     the data's mean token direction is above the Otsu split of all tokens' cosines (so tokens
     that merely share hub neighbours but differ from image to image stay alive);
  4. everything else is alive.
  Each token's `reason` names the rule that fired with its numbers.

That `category` is exclusive (ViT sink, then LLM sink, then dead, else alive). Beside it each token
carries its membership of the reference's groups (`TokenRule.groups`): `in_sink_vit`, `in_sink_llm`,
`in_sink` (either sink role), `in_dead` and `in_alive` (in none of these). As in the reference the
groups overlap, so their fractions may sum to more than 1: under `embedlens` a token is in every group
with an anchor id among its top-k; under `auto` likewise by the discovered anchors' roles, and also
in the group of its exclusive category (the norm-outlier sinks are in the sink group). An exclusive
sink or dead token is thus always in its group; an exclusive alive token is in the alive group unless
an anchor among its top-k puts it in another group.

The rule with its discovered anchors and norm statistics is saved in `summary.json`, so the
same decisions can be applied to new images (the interventions analysis does).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from skimage.filters import threshold_otsu

from analyses.runner import run_batches
from analyses.token_evidence import ANALYSIS_PROMPT, EvidenceLayers, token_evidence
from workbench.data.image_sets import ImageSet
from workbench.errors import InputError
from workbench.models.loading import LoadedModel
from workbench.store import RunStore

CATEGORIES = ("sink", "dead", "alive")
ROLES = ("sink_vit", "sink_llm", "dead")  # anchor roles, in the order the exclusive rule tries them
GROUPS = ("sink", "sink_vit", "sink_llm", "dead", "alive")  # the reference's groups: column `in_<group>`
RuleKind = Literal["auto", "embedlens"]
ROBUST_SD = 1.4826  # MAD -> standard deviation for normal data
EVIDENCE_COLUMNS = {"vision": "vision_norm", "llm": "llm_norm", "peak": "llm_peak", "attention": "attention_received"}


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
    stats: dict[str, RobustStats] = field(default_factory=dict)  # "vision", "llm", "peak", "attention"
    mean_direction: list[float] = field(default_factory=list)  # the data's mean token direction, in sketch space
    typicality_threshold: float = float("nan")  # Otsu split of tokens' cosine to `mean_direction`
    # Directions of outliers that recur across images, per source ("vit", "llm"): an outlier within
    # `sink_consistency` (cosine) of one of them is a sink.
    sink_prototypes: dict[str, list[list[float]]] = field(default_factory=dict)
    sink_consistency: float = 0.9

    def anchor_ids(self, role: str) -> set[int]:
        return {anchor.id for anchor in self.anchors if anchor.role == role}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenRule:
        return cls(kind=data["kind"], topk=data["topk"], anchors=[Anchor(**anchor) for anchor in data["anchors"]],
                   z_threshold=data["z_threshold"],
                   stats={name: RobustStats(**value) for name, value in data["stats"].items()},
                   mean_direction=data["mean_direction"], typicality_threshold=data["typicality_threshold"],
                   sink_prototypes=data["sink_prototypes"], sink_consistency=data["sink_consistency"])

    def typicality(self, evidence: pd.DataFrame) -> np.ndarray:
        """Cosine of each token's sketch with the data's mean direction (1 = the most common token)."""
        return unit_sketches(evidence) @ np.asarray(self.mean_direction, dtype=np.float32)

    def z_scores(self, evidence: pd.DataFrame) -> dict[str, np.ndarray]:
        """Robust z-score of each evidence column ("vision", "llm", "peak", "attention")."""
        return {name: self.stats[name].z(evidence[column].to_numpy()) for name, column in EVIDENCE_COLUMNS.items()}

    def outliers(self, evidence: pd.DataFrame) -> dict[str, np.ndarray]:
        """Masks of norm outliers by source: "vit" (vision features), "llm" (norm and massive activation)."""
        z = self.z_scores(evidence)
        vit = z["vision"] > self.z_threshold
        return {"vit": vit, "llm": ~vit & (z["llm"] > self.z_threshold) & (z["peak"] > self.z_threshold)}

    def classify(self, evidence: pd.DataFrame) -> pd.DataFrame:
        """`category`, `sink_source`, `reason` (and the z-scores for `auto`) for each evidence row."""
        return _classify_embedlens(self, evidence) if self.kind == "embedlens" else _classify_auto(self, evidence)

    def groups(self, evidence: pd.DataFrame, decided: pd.DataFrame | None = None) -> pd.DataFrame:
        """Each evidence row's membership of the reference groups, the `in_<group>` columns (see the module
        docstring). `decided`: this rule's `classify(evidence)`, when already at hand."""
        member = {role: self._near_anchor(evidence, role) for role in ROLES}
        if self.kind == "auto":
            decided = self.classify(evidence) if decided is None else decided
            sink = (decided["category"] == "sink").to_numpy()
            member["sink_vit"] |= sink & (decided["sink_source"] == "vit").to_numpy()
            member["sink_llm"] |= sink & (decided["sink_source"] == "llm").to_numpy()
            member["dead"] |= (decided["category"] == "dead").to_numpy()
        member["sink"] = member["sink_vit"] | member["sink_llm"]
        member["alive"] = ~(member["sink"] | member["dead"])
        return pd.DataFrame({f"in_{group}": member[group] for group in GROUPS}, index=evidence.index)

    def decide(self, evidence: pd.DataFrame) -> pd.DataFrame:
        """`classify` and `groups` side by side."""
        decided = self.classify(evidence)
        return pd.concat([decided, self.groups(evidence, decided)], axis=1)

    def _near_anchor(self, evidence: pd.DataFrame, role: str) -> np.ndarray:
        """Whether an anchor id of `role` is among each row's top-k neighbours."""
        ids = self.anchor_ids(role)
        return np.array([not ids.isdisjoint(list(topk_ids)[:self.topk]) for topk_ids in evidence["topk_ids"]],
                        dtype=bool)


def unit_sketches(evidence: pd.DataFrame) -> np.ndarray:
    sketches = np.stack(evidence["sketch"].to_numpy()).astype(np.float32)
    return sketches / (np.linalg.norm(sketches, axis=1, keepdims=True) + 1e-12)


def mean_direction(unit_vectors: np.ndarray) -> list[float]:
    if not len(unit_vectors):
        return []
    mean = unit_vectors.astype(np.float64).mean(0)
    return (mean / (np.linalg.norm(mean) + 1e-12)).round(6).tolist()


def recurring_directions(units: np.ndarray, image_ids: np.ndarray, min_cosine: float, min_coverage: float,
                         num_images: int, max_tokens: int = 4000) -> list[list[float]]:
    """Mean directions of groups of near-identical vectors (cosine >= `min_cosine`) that occur in at
    least `min_coverage` of the images: the image-agnostic ones. Greedy, densest group first."""
    if len(units) > max_tokens:  # pairwise cosines grow quadratically; a seeded sample finds the same groups
        keep = np.random.default_rng(0).choice(len(units), max_tokens, replace=False)
        units, image_ids = units[keep], image_ids[keep]
    close = units @ units.T >= min_cosine
    remaining = np.ones(len(units), dtype=bool)
    prototypes = []
    while remaining.any():
        counts = (close & remaining).sum(1) * remaining
        seed = int(counts.argmax())
        group = close[seed] & remaining
        if len(set(image_ids[group])) < min_coverage * num_images:
            break  # the densest group left is not image-agnostic; smaller ones cover fewer images still
        prototypes.append(mean_direction(units[group]))
        remaining &= ~group
    return prototypes


def _first_anchor(topk_ids: list[int], ids: set[int]) -> int | None:
    return next((token_id for token_id in topk_ids if token_id in ids), None)


def _classify_embedlens(rule: TokenRule, evidence: pd.DataFrame) -> pd.DataFrame:
    decisions = []
    for topk_ids in evidence["topk_ids"]:
        decision = ("alive", "", f"no anchor among the top-{rule.topk}")
        for role, (category, source) in zip(ROLES, [("sink", "vit"), ("sink", "llm"), ("dead", "")]):
            hit = _first_anchor(list(topk_ids)[:rule.topk], rule.anchor_ids(role))
            if hit is not None:
                decision = (category, source, f"top-{rule.topk} contains the {role} anchor {hit}")
                break
        decisions.append(decision)
    return pd.DataFrame(decisions, columns=["category", "sink_source", "reason"], index=evidence.index)


def _outlier_reason(source: str, row: pd.Series, z: dict[str, float]) -> str:
    if source == "vit":
        return f"vision-feature norm {row['vision_norm']:.1f} is {z['vision']:.1f} robust SDs above the median"
    return (f"massive activation in the LLM's early layers: norm {row['llm_norm']:.1f} (z {z['llm']:.1f}), "
            f"peak coordinate {row['llm_peak']:.0f}x the RMS (z {z['peak']:.1f})")


def _auto_decision(rule: TokenRule, anchor: Anchor | None, row: pd.Series, z: dict[str, float],
                   typical: float, outlier: tuple[str, float] | None) -> tuple[str, str, str]:
    """(category, sink source, reason) of one token under the auto rule; `outlier` is (source, cosine to
    that source's outlier direction) for a norm outlier."""
    limit, threshold = rule.z_threshold, rule.typicality_threshold
    if outlier is not None:
        source, consistency = outlier
        if consistency >= rule.sink_consistency:
            return "sink", source, (f"{_outlier_reason(source, row, z)}; image-agnostic: cosine {consistency:.2f} "
                                    f"to an outlier direction recurring across images (>= {rule.sink_consistency})")
        return "alive", "", (f"{_outlier_reason(source, row, z)}, but image-specific: cosine {consistency:.2f} "
                             f"to the recurring outlier directions (< {rule.sink_consistency})")
    if anchor is not None and z["attention"] > limit:
        return "sink", "llm", (f"near anchor {anchor.token!r} and draws attention {z['attention']:.1f} robust SDs "
                               f"above the median")
    if anchor is not None and typical >= threshold:
        return "dead", "", (f"top-{rule.topk} contains anchor {anchor.token!r} (near {anchor.share:.0%} of tokens "
                            f"in {anchor.coverage:.0%} of images) and the token is typical of the data (cosine "
                            f"{typical:.2f} to the mean direction >= {threshold:.2f})")
    if anchor is not None:
        return "alive", "", (f"near anchor {anchor.token!r} but image-specific (cosine {typical:.2f} to the mean "
                             f"direction < {threshold:.2f})")
    return "alive", "", (f"no anchor among the top-{rule.topk}; norms ordinary (vision z {z['vision']:.1f}, "
                         f"LLM z {z['llm']:.1f})")


def _classify_auto(rule: TokenRule, evidence: pd.DataFrame) -> pd.DataFrame:
    z = rule.z_scores(evidence)
    typical = rule.typicality(evidence)
    outliers = rule.outliers(evidence)
    units = unit_sketches(evidence)
    consistency = {source: (units @ np.asarray(prototypes, dtype=np.float32).T).max(1) if prototypes
                   else np.full(len(evidence), -1.0) for source, prototypes in rule.sink_prototypes.items()}
    anchors = {anchor.id: anchor for anchor in rule.anchors}
    decisions = []
    for i, (_, row) in enumerate(evidence.iterrows()):
        hit = _first_anchor(list(row["topk_ids"])[:rule.topk], set(anchors))
        scores = {name: float(values[i]) for name, values in z.items()}
        outlier = next(((source, float(consistency[source][i])) for source in outliers if outliers[source][i]), None)
        decisions.append(_auto_decision(rule, anchors.get(hit), row, scores, float(typical[i]), outlier))
    decided = pd.DataFrame(decisions, columns=["category", "sink_source", "reason"], index=evidence.index)
    return decided.assign(vision_z=z["vision"], llm_z=z["llm"], peak_z=z["peak"], attention_z=z["attention"],
                          typicality=typical)


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


def discover_anchors(evidence: pd.DataFrame, rule: TokenRule, consistency: dict[int, float], tokenizer,
                     min_share: float, min_coverage: float) -> list[Anchor]:
    """Image-agnostic nearest-vocabulary ids, each with the role its tokens' outliers (by `rule`) suggest."""
    outliers = rule.outliers(evidence)
    exploded = evidence[["image_id", "topk_ids"]].assign(vision_outlier=outliers["vit"], llm_outlier=outliers["llm"])
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
    return anchors


def discover_rule(evidence: pd.DataFrame, groups: dict[str, torch.Tensor], tokenizer, config: TokensConfig) -> TokenRule:
    """The auto rule fitted to a run's evidence: norm statistics, anchors, typicality split, sink prototypes."""
    stats = {name: RobustStats.of(evidence[column].to_numpy()) for name, column in EVIDENCE_COLUMNS.items()}
    rule = TokenRule("auto", config.topk, [], config.z_threshold, stats, sink_consistency=config.sink_consistency)
    rule.anchors = discover_anchors(evidence, rule, group_consistency(groups), tokenizer, config.min_share,
                                    config.min_coverage)
    units = unit_sketches(evidence)
    rule.mean_direction = mean_direction(units)
    rule.typicality_threshold = round(float(threshold_otsu(rule.typicality(evidence))), 6)
    image_ids = evidence["image_id"].to_numpy()
    rule.sink_prototypes = {source: recurring_directions(units[mask], image_ids[mask], config.sink_consistency,
                                                         config.min_coverage, len(set(image_ids)))
                            for source, mask in rule.outliers(evidence).items()}
    return rule


# --- the analysis -------------------------------------------------------------------

@dataclass(frozen=True)
class TokensConfig:
    rule: RuleKind = "auto"
    # For the embedlens rule: role ("sink_vit", "sink_llm", "dead") -> its anchor vocabulary ids.
    anchors: dict[str, tuple[int, ...]] | None = None
    topk: int = 3
    z_threshold: float = 3.5
    min_share: float = 0.05
    min_coverage: float = 0.5
    sink_consistency: float = 0.9
    batch_size: int = 8
    prompt: str = ANALYSIS_PROMPT

    def __post_init__(self):
        anchors = self.anchors or {}
        if self.rule == "embedlens" and not any(anchors.values()):
            raise InputError("--rule embedlens needs anchor ids: --sink-vit IDS, --sink-llm IDS and/or --dead IDS")
        if self.rule == "auto" and any(anchors.values()):
            raise InputError("anchor ids (--sink-vit, --sink-llm, --dead) are for --rule embedlens; "
                             "the auto rule discovers its own")
        if set(anchors) - set(ROLES):
            raise InputError(f"unknown anchor roles {sorted(set(anchors) - set(ROLES))}; the roles are {ROLES}")
        for first, second in itertools.combinations(anchors, 2):
            if shared := sorted(set(anchors[first]) & set(anchors[second])):
                raise InputError(f"anchor id {shared[0]} is given to two roles, {_flag(first)} and {_flag(second)}; "
                                 f"give each id one role")
        if self.topk < 1:
            raise InputError(f"--topk must be at least 1 (got {self.topk})")


def _flag(role: str) -> str:
    """The `wb analyze tokens` option that gives a role's anchor ids."""
    return "--" + role.replace("_", "-")


def given_anchors(loaded: LoadedModel, anchor_ids: dict[str, tuple[int, ...]]) -> list[Anchor]:
    """The embedlens rule's anchors, each id checked to be a vocabulary row that can be a neighbour."""
    tokenizer = loaded.processor.tokenizer
    num_rows = loaded.adapter.embed_tokens.weight.shape[0]
    image_token = loaded.adapter.image_token_id
    excluded = loaded.adapter.non_text_vocabulary_rows(tokenizer)
    anchors = []
    for role, ids in anchor_ids.items():
        for token_id in ids:
            if not 0 <= token_id < num_rows or token_id == image_token or token_id in excluded.rows:
                never = [] if image_token in excluded.rows else [f"{image_token} (the image token)"]
                never += [excluded.describe()] if excluded.rows else []
                raise InputError(f"{_flag(role)} {token_id} can never be a neighbour (vocabulary ids 0-{num_rows - 1}; "
                                 f"excluded: {', '.join(never)})")
            anchors.append(Anchor(token_id, tokenizer.decode([token_id]), role, float("nan"), float("nan"),
                                  float("nan")))
    return anchors


def summarise(table: pd.DataFrame, rule: TokenRule) -> dict:
    fractions = table["category"].value_counts(normalize=True)
    per_image_alive = table.groupby("image_id")["category"].apply(lambda c: float((c == "alive").mean()))
    summary = {
        "num_images": int(table["image_id"].nunique()),
        "num_tokens": len(table),
        "fractions": {category: float(fractions.get(category, 0.0)) for category in CATEGORIES},
        "group_fractions": {group: float(table[f"in_{group}"].mean()) for group in GROUPS},
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
    anchors = given_anchors(loaded, config.anchors) if config.rule == "embedlens" else []
    store = RunStore.open(out, kind="tokens", model=loaded.name, data=images.source, config=asdict(config))
    layers = EvidenceLayers.for_depth(loaded.adapter.num_llm_layers)
    evidence, top1_sums = run_batches(
        store, images, config.batch_size, "evidence",
        lambda items, pil: token_evidence(loaded, items, pil, config.topk, layers, config.prompt),
        "token evidence")
    tokenizer = loaded.processor.tokenizer
    if config.rule == "embedlens":
        rule = TokenRule("embedlens", config.topk, anchors, config.z_threshold)
    else:
        rule = discover_rule(evidence, top1_sums, tokenizer, config)
    table = pd.concat([evidence, rule.decide(evidence)], axis=1)
    store.write_table("tokens", table)
    summary = summarise(table, rule) | {"evidence_layers": asdict(layers),
                                        "skipped_images": store.manifest["skipped_images"]}
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.adapter.num_llm_layers,
                 excluded_vocabulary_rows=loaded.adapter.non_text_vocabulary_rows(tokenizer).describe())
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
