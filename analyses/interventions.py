"""`wb analyze interventions`: probe-scene VQA accuracy when the LLM's use of visual tokens is cut.

Validates what the tokens, alignment and similarity analyses recommend. Conditions:
- all tokens; no visual tokens;
- remove the sink / dead / alive tokens, each next to removing as many random visual tokens of
  the same image (matched control);
- skip the attention or the MLP update of visual tokens at `skip_layers`;
- cut visual->visual attention at every layer;
- exit: the visual tokens leave the sequence before layer X, for X in `exit_layers`;
- late injection: visual tokens enter at layer L (text keeps its positions), for L in `inject_layers`.
Removal, exit and injection run the model under a token schedule (`efficient_models.token_schedule.engine`),
so every other token keeps its position id; skipping and cutting attention use hook interventions.
Each condition's result is stored as it finishes, so an interrupted run resumes at the next condition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
from tqdm.auto import tqdm

from analyses.tokens import token_rule
from analyses.vqa_conditions import TokenCategories, accuracy_under, hooked, removal, scheduled
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.data.image_sets import ImageSet
from workbench.evaluation.vqa import Generator, select_questions
from workbench.hook_interventions import Intervention
from workbench.models.loading import LoadedModel
from workbench.store import RunStore


@dataclass(frozen=True)
class InterventionsConfig:
    questions: int = 60
    split: str = "val"
    batch_size: int = 8
    skip_layers: tuple[int, ...] | None = None  # None: the second half of the LLM
    exit_layers: tuple[int, ...] | None = None  # None: half and three quarters of the depth
    inject_layers: tuple[int, ...] | None = None  # None: an eighth and a quarter of the depth

    def resolved(self, num_layers: int) -> dict[str, list[int]]:
        return {
            "skip_layers": list(self.skip_layers or range(num_layers // 2, num_layers)),
            "exit_layers": list(self.exit_layers or sorted({num_layers // 2, 3 * num_layers // 4})),
            "inject_layers": list(self.inject_layers or sorted({max(1, num_layers // 8), num_layers // 4})),
        }


def conditions(loaded: LoadedModel, categories: TokenCategories, layers: dict[str, list[int]]
               ) -> dict[str, Generator | None]:
    num_layers = loaded.adapter.num_llm_layers
    skip = frozenset(layers["skip_layers"])
    span = f"layers {min(skip)}-{max(skip)}" if skip else "no layers"
    result: dict[str, Generator | None] = {
        "all tokens": None,
        "no visual tokens": removal(loaded, categories, ("sink", "dead", "alive")),
    }
    for category in ("sink", "dead", "alive"):
        result[f"remove {category}"] = removal(loaded, categories, (category,))
        result[f"remove random, as many as {category}"] = removal(loaded, categories, (category,), random_control=True)
    result[f"skip visual attention, {span}"] = hooked(loaded, Intervention(skip_attention=skip))
    result[f"skip visual MLP, {span}"] = hooked(loaded, Intervention(skip_mlp=skip))
    every_layer = frozenset(range(num_layers))
    result["no visual->visual attention"] = hooked(loaded, Intervention(block_visual_to_visual=every_layer))
    for layer in layers["exit_layers"]:
        result[f"exit at layer {layer}"] = scheduled(loaded, TokenSchedule(num_layers, exit_layer=layer))
    for layer in layers["inject_layers"]:
        result[f"inject at layer {layer}"] = scheduled(loaded, TokenSchedule(num_layers, inject_layer=layer))
    return result


def analyze_interventions(loaded: LoadedModel, images: ImageSet, out: str,
                          config: InterventionsConfig = InterventionsConfig(), tokens_run: str | None = None) -> dict:
    """`images` are used to find the token categories (when no `tokens_run` is given)."""
    layers = config.resolved(loaded.adapter.num_llm_layers)
    store = RunStore.open(out, kind="interventions", model=loaded.name, data=images.source,
                          config=asdict(config) | layers | {"tokens_run": tokens_run})
    rule = token_rule(loaded, images, out, tokens_run)
    questions = select_questions(config.split, config.questions)
    categories = TokenCategories(loaded, rule, questions, config.batch_size)
    rows = []
    for index, (name, condition) in enumerate(tqdm(conditions(loaded, categories, layers).items(),
                                                   desc="interventions", leave=False)):
        if not store.has_part("condition", index):
            accuracy = accuracy_under(loaded, questions, condition, config.batch_size)
            store.write_part("condition", index, pd.DataFrame([{"condition": name} | accuracy]))
        rows.append(store.read_part("condition", index)[0])
    table = pd.concat(rows, ignore_index=True)
    store.write_table("conditions", table)
    summary = {"questions": len(questions), "split": config.split, "layers": layers,
               "category_fractions": {c: categories.fraction(c) for c in ("sink", "dead", "alive")},
               "accuracy": dict(zip(table["condition"], table["overall"]))}
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.adapter.num_llm_layers)
    return summary
