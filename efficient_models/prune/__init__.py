"""Category pruning (EmbedLens): only visual tokens of some categories (sink / dead / alive) enter the LLM.

Registers the `prune` method: its config (the tokens run's rule and measured category shares) and its
FLOPs count. The categories are decided per image by the tokens analysis, so the pruned model runs in
`wb analyze interventions`, which categorises each image first; it has no bench variant of its own.
"""

from __future__ import annotations

from typing import Literal

from efficient_models.registry import Method, register
from workbench.configs import LayeredConfig
from workbench.errors import InputError


class PruneConfig(LayeredConfig):
    """Keep only visual tokens of `keep_categories`, decided by the tokens run's rule."""

    method: Literal["prune"] = "prune"
    keep_categories: list[Literal["sink", "dead", "alive"]] = ["alive"]
    rule: dict  # analyses.tokens.TokenRule.to_dict(): kind, top-k, anchors, norm statistics
    measured_fractions: dict[str, float]

    def kept_share(self) -> float:
        return sum(self.measured_fractions.get(category, 0.0) for category in self.keep_categories)


def _flops(config: PruneConfig, shapes, text_tokens, answer_tokens=1, decode_steps=1):
    from workbench.flops import token_schedule_flops

    kept = round(shapes.visual_tokens_per_image * config.kept_share())
    return token_schedule_flops(shapes, text_tokens, [kept] * shapes.num_llm_layers, answer_tokens, decode_steps)


def _from_run(store) -> dict:
    """From a tokens run, or the tokens run an alignment / probe / interventions run made in its folder."""
    from workbench.store import RunStore

    if store.manifest["kind"] != "tokens":
        nested = store.folder / "tokens"
        if not (nested / "manifest.json").exists():
            raise InputError(f"{store.folder} is a {store.manifest['kind']!r} run with no token categories; "
                             "export --method prune from a tokens run")
        store = RunStore.load(nested, kind="tokens")
    summary = store.read_json("summary")
    return {"rule": summary["rule"], "measured_fractions": summary["fractions"]}


register(Method(name="prune", summary="keep only visual tokens of some categories (sink / dead / alive)",
                config=PruneConfig, flops=_flops, from_run=_from_run, run_kinds=("tokens",)))
