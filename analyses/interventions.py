"""`wb analyze interventions`: probe-scene VQA accuracy when the LLM's use of visual tokens is cut.

Validates what the tokens, alignment and similarity analyses recommend. Conditions:
- all tokens; no visual tokens;
- remove the sink / dead / alive tokens, each next to removing as many random tokens of the same
  image (matched control). By default as the reference does (`groups="reference"`): a category is
  its group, so "remove sink" removes the tokens of either sink role and the groups overlap;
  `groups="exclusive"` removes exclusive categories. The controls draw from the alive tokens, as in
  the reference (`control_from="all"`: from all visual tokens), except that of "remove alive", which
  always draws from all (from the alive ones it would be the condition itself);
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

from analyses.tokens import CATEGORIES, token_rule
from analyses.vqa_conditions import (ControlPool, GroupSemantics, TokenCategories, accuracy_under, hooked, removal,
                                     scheduled)
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.data.image_sets import ImageSet
from workbench.evaluation.vqa import Generator, select_questions
from workbench.errors import InputError
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
    groups: GroupSemantics = "reference"  # remove the reference's (overlapping) groups, or exclusive categories
    control_from: ControlPool = "alive"  # where the random controls draw from ("remove alive": always all)

    def __post_init__(self):
        if self.groups not in ("reference", "exclusive"):
            raise InputError(f"unknown --groups {self.groups!r}; choose reference or exclusive")
        if self.control_from not in ("alive", "all"):
            raise InputError(f"unknown --control-from {self.control_from!r}; choose alive or all")

    def resolved(self, num_layers: int) -> dict[str, list[int]]:
        return {
            "skip_layers": list(self.skip_layers or range(num_layers // 2, num_layers)),
            "exit_layers": list(self.exit_layers or sorted({num_layers // 2, 3 * num_layers // 4})),
            "inject_layers": list(self.inject_layers or sorted({max(1, num_layers // 8), num_layers // 4})),
        }


def control_pool(category: str, control_from: ControlPool) -> ControlPool:
    # Drawing the control of "remove alive" from the alive tokens would remove those very tokens.
    return "all" if category == "alive" else control_from


def control_name(category: str, pool: ControlPool) -> str:
    return f"remove random (from {pool}), as many as {category}"


def conditions(loaded: LoadedModel, categories: TokenCategories, layers: dict[str, list[int]],
               control_from: ControlPool = "alive") -> dict[str, Generator | None]:
    num_layers = loaded.adapter.num_llm_layers
    skip = frozenset(layers["skip_layers"])
    span = f"layers {min(skip)}-{max(skip)}" if skip else "no layers"
    result: dict[str, Generator | None] = {
        "all tokens": None,
        "no visual tokens": removal(loaded, categories, CATEGORIES),
    }
    for category in CATEGORIES:
        pool = control_pool(category, control_from)
        result[f"remove {category}"] = removal(loaded, categories, (category,))
        result[control_name(category, pool)] = removal(loaded, categories, (category,), random_from=pool)
    result[f"skip visual attention, {span}"] = hooked(loaded, Intervention(skip_attention=skip))
    result[f"skip visual MLP, {span}"] = hooked(loaded, Intervention(skip_mlp=skip))
    every_layer = frozenset(range(num_layers))
    result["no visual->visual attention"] = hooked(loaded, Intervention(block_visual_to_visual=every_layer))
    for layer in layers["exit_layers"]:
        result[f"exit at layer {layer}"] = scheduled(loaded, TokenSchedule(num_layers, exit_layer=layer))
    for layer in layers["inject_layers"]:
        result[f"inject at layer {layer}"] = scheduled(loaded, TokenSchedule(num_layers, inject_layer=layer))
    return result


def control_shortfalls(categories: TokenCategories, control_from: ControlPool) -> dict[str, dict[str, int]]:
    """Per control condition: the images whose pool was smaller than its draw, and the tokens taken outside it."""
    shortfalls = {}
    for category in CATEGORIES:
        pool = control_pool(category, control_from)
        shortfalls[control_name(category, pool)] = categories.control_shortfall((category,), pool)
    return shortfalls


def analyze_interventions(loaded: LoadedModel, images: ImageSet, out: str,
                          config: InterventionsConfig = InterventionsConfig(), tokens_run: str | None = None) -> dict:
    """`images` are used to find the token categories (when no `tokens_run` is given)."""
    layers = config.resolved(loaded.adapter.num_llm_layers)
    store = RunStore.open(out, kind="interventions", model=loaded.name, data=images.source,
                          config=asdict(config) | layers | {"tokens_run": tokens_run})
    rule = token_rule(loaded, images, out, tokens_run)
    questions = select_questions(config.split, config.questions)
    categories = TokenCategories.of_questions(loaded, rule, questions, config.batch_size, config.groups)
    rows = []
    for index, (name, condition) in enumerate(tqdm(conditions(loaded, categories, layers, config.control_from).items(),
                                                   desc="interventions", leave=False)):
        if not store.has_part("condition", index):
            accuracy = accuracy_under(loaded, questions, condition, config.batch_size)
            store.write_part("condition", index, pd.DataFrame([{"condition": name} | accuracy]))
        rows.append(store.read_part("condition", index)[0])
    table = pd.concat(rows, ignore_index=True)
    store.write_table("conditions", table)
    summary = {"questions": len(questions), "split": config.split, "layers": layers,
               "groups": config.groups, "control_from": config.control_from,
               "fractions": categories.fractions("exclusive"), "group_fractions": categories.fractions("reference"),
               "control_shortfall": control_shortfalls(categories, config.control_from),
               "accuracy": dict(zip(table["condition"], table["overall"]))}
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.adapter.num_llm_layers)
    return summary
