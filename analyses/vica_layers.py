"""`wb analyze vica-layers`: at which decoder layers the text needs to read the image (ViCA's layer choice).

Each probe-scene question is run as prompt + reference answer (teacher-forced, as `wb train` supervises it).
Text->visual attention is cut at one layer at a time (`workbench.hook_interventions`); per layer, as means
over the questions of what the cut costs against the intact model:
- `loss_increase`: the mean cross entropy of the answer tokens and end of turn (the direct measure);
- `logprob_drop`: the log-probability of the whole reference answer;
- `accuracy_drop`: the share of questions whose greedy answer is the reference token for token (what greedy
  generation would answer; stricter than `wb eval vqa`'s normalised match, and as coarse as 1/questions);
- `loss_change`: the mean absolute change of that loss. Where the image misleads on some questions (a model
  that sees little), cutting a layer lowers their loss and the signed mean hides that the layer reads the
  image; this one does not.
Cheaper proxies, from the intact run:
- `attention_mass`: attention probability text queries after the image put on visual keys, mean over heads;
- `vision_effect`: 1 - cosine between the text's states after the layer with the image and with text->visual
  cut at every layer (the text alone at its own positions: the similarity run's measure, on these prompts);
  `vision_effect_step` its rise over the layer before.
`efficient_models.vica.layer_choice` chooses layers from the `layers` table and compares the proxies with it.

Cutting at layer l changes no token before the end of a row's image, so the prompt up to the earliest end of
an image in the batch runs once and its key/value cache is reused by every condition; only the rest runs per
cut. The input embeddings and position ids are built outside the model, as a token schedule builds them, so the
analysis runs on the adapters with `token_schedules`. Each question batch is stored as it finishes, so an
interrupted run resumes at the next batch.

Outputs: `per_question.parquet` (question, type, layer, its scores cut / intact / text-blind, its proxies),
`layers.parquet` (the means above per layer), `agreement.parquet` (`layer_choice.proxy_agreement`) and
`summary.json` (intact and text-blind loss and accuracy, the ranking, the chosen layers for k = 4, 8, 12, the
comparison sets).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from efficient_models.bench.probe_inputs import probe_batches
from efficient_models.vica.layer_choice import COMPARISON_KS, DIRECT, choose_layers, comparison_sets, proxy_agreement
from workbench.errors import InputError
from workbench.evaluation.vqa import select_questions
from workbench.hook_interventions import Intervention, intervene
from workbench.models.loading import LoadedModel
from workbench.store import RunStore
from workbench.tracing import eager_attention
from workbench.training.sequences import IGNORE_INDEX


@dataclass(frozen=True)
class VicaLayersConfig:
    questions: int = 16
    split: str = "val"
    batch_size: int = 8

    def __post_init__(self):
        if self.questions < 1 or self.batch_size < 1:
            raise InputError(f"questions and batch size must be at least 1 (got {self.questions}, {self.batch_size})")


def _last_visual(visual: torch.Tensor) -> torch.Tensor:
    """[batch]: each row's last visual column."""
    if not visual.any(1).all():
        raise InputError("every row needs an image: cutting text->visual attention means nothing without one")
    return visual.shape[1] - 1 - visual.flip(1).int().argmax(1)


def _output(output) -> torch.Tensor:
    """Module outputs are a tensor or a tuple led by one, depending on the class."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooked(modules, keep) -> Iterator[None]:
    """`keep(index, output)` on the output of every module while inside."""
    handles = [module.register_forward_hook(lambda _, args, output, index=index: keep(index, output))
               for index, module in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PrefilledBatch:
    """A supervised batch whose shared prefix (up to the earliest end of an image) has run once."""

    def __init__(self, loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor):
        adapter = loaded.adapter
        self.loaded, self.inputs = loaded, inputs
        visual = adapter.visual_token_mask(inputs["input_ids"])
        last_visual = _last_visual(visual)
        self.split = int(last_visual.min()) + 1
        # The answer must come after every image, so that the prefix's logits predict none of it.
        if (labels[:, :self.split + 1] != IGNORE_INDEX).any():
            raise InputError("supervised answer tokens must follow the image in every row")
        self.targets = labels[:, self.split + 1:]
        self.visual = visual
        columns = torch.arange(visual.shape[1], device=visual.device)
        real = inputs["attention_mask"].bool()
        self.after_image = ((columns[None] > last_visual[:, None]) & real)[:, self.split:]
        with torch.no_grad():
            self.embeddings = adapter.input_embeddings(inputs)
            self.positions = adapter.position_ids(inputs)
            self.cache = adapter.language_model(
                inputs_embeds=self.embeddings[:, :self.split], attention_mask=inputs["attention_mask"][:, :self.split],
                position_ids=self.positions[..., :self.split], use_cache=True).past_key_values

    @torch.no_grad()
    def run(self, intervention: Intervention = Intervention()) -> torch.Tensor:
        """The rest of the batch under `intervention`: [batch, rest - 1, vocab] logits of `targets`."""
        adapter = self.loaded.adapter
        # On a copy of the cache: the run appends the rest to it, and the next condition needs the prefix alone.
        with intervene(self.loaded, self.inputs, intervention):
            hidden = adapter.language_model(
                inputs_embeds=self.embeddings[:, self.split:], attention_mask=self.inputs["attention_mask"],
                position_ids=self.positions[..., self.split:], past_key_values=copy.deepcopy(self.cache),
                use_cache=True).last_hidden_state
        return adapter.lm_head(hidden[:, :-1]).float()

    def layer_outputs(self, intervention: Intervention = Intervention()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`run`'s logits and each decoder layer's output [batch, rest, d] for the rest of the batch."""
        outputs: dict[int, torch.Tensor] = {}
        with _hooked(self.loaded.adapter.llm_layers, lambda layer, output: outputs.__setitem__(layer, _output(output))):
            logits = self.run(intervention)
        return logits, [outputs[layer] for layer in sorted(outputs)]

    def attention_mass(self) -> torch.Tensor:
        """[layers, batch]: attention probability the text after the image puts on visual keys, mean over heads
        and over those queries."""
        visual_keys = self.visual[:, None, None, :].float()
        masses: dict[int, torch.Tensor] = {}

        def keep(layer: int, output) -> None:
            mass = (output[1].float() * visual_keys).sum(-1).mean(1)  # [batch, queries]
            masses[layer] = (mass * self.after_image).sum(1) / self.after_image.sum(1)

        with eager_attention(self.loaded, True), _hooked([block.self_attn for block in self.loaded.adapter.llm_layers],
                                                         keep):
            self.run()
        return torch.stack([masses[layer] for layer in sorted(masses)])


def answer_scores(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: mean cross entropy of the supervised `targets` (`loss`), their summed log-probability (`logprob`),
    and whether every one is the greedy choice (`correct`)."""
    supervised = targets != IGNORE_INDEX
    if not supervised.any(1).all():
        raise InputError("every row needs supervised answer tokens")
    token_logprob = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * supervised
    logprob = token_logprob.sum(1)
    return {"loss": -logprob / supervised.sum(1), "logprob": logprob,
            "correct": ((logits.argmax(-1) == targets) | ~supervised).all(1).float()}


def _vision_effect(with_image: torch.Tensor, blind: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[batch]: 1 - cosine between the two states, mean over the `text` positions."""
    distance = 1 - F.cosine_similarity(with_image.float(), blind.float(), dim=-1)
    return (distance * text).sum(1) / text.sum(1)


def measure_cuts(loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> pd.DataFrame:
    """One row per (batch row, layer): the answer's `loss` / `logprob` / `correct` with text->visual attention cut
    at that layer, the same intact (`intact_*`) and cut at every layer (`blind_*`), and the row's proxies."""
    batch = PrefilledBatch(loaded, inputs, labels)
    num_layers = loaded.adapter.num_llm_layers
    every_layer = Intervention(block_text_to_visual=frozenset(range(num_layers)))
    intact_logits, intact_states = batch.layer_outputs()
    blind_logits, blind_states = batch.layer_outputs(every_layer)
    intact = answer_scores(intact_logits, batch.targets)
    blind = answer_scores(blind_logits, batch.targets)
    mass = batch.attention_mass()
    rows = []
    for layer in range(num_layers):
        cut = answer_scores(batch.run(Intervention(block_text_to_visual=frozenset({layer}))), batch.targets)
        effect = _vision_effect(intact_states[layer], blind_states[layer], batch.after_image)
        for row in range(len(labels)):
            rows.append({"row": row, "layer": layer}
                        | {name: float(value[row]) for name, value in cut.items()}
                        | {f"intact_{name}": float(value[row]) for name, value in intact.items()}
                        | {f"blind_{name}": float(value[row]) for name, value in blind.items()}
                        | {"attention_mass": float(mass[layer, row]), "vision_effect": float(effect[row])})
    return pd.DataFrame(rows)


def layer_table(per_question: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: the means over questions of the module docstring's measures."""
    frame = per_question.assign(
        loss_increase=per_question["loss"] - per_question["intact_loss"],
        logprob_drop=per_question["intact_logprob"] - per_question["logprob"],
        accuracy_drop=per_question["intact_correct"] - per_question["correct"],
        loss_change=(per_question["loss"] - per_question["intact_loss"]).abs())
    layers = frame.groupby("layer", as_index=False)[
        ["loss_increase", "logprob_drop", "accuracy_drop", "loss_change", "loss", "correct", "attention_mass",
         "vision_effect"]].mean()
    layers["vision_effect_step"] = layers["vision_effect"].diff().fillna(layers["vision_effect"])
    return layers.rename(columns={"correct": "accuracy"})


def analyze_vica_layers(loaded: LoadedModel, out: str, config: VicaLayersConfig = VicaLayersConfig()) -> dict:
    num_layers = loaded.adapter.num_llm_layers
    store = RunStore.open(out, kind="vica-layers", model=loaded.name, data=f"vqa:{config.split}:{config.questions}",
                          config=asdict(config))
    questions = select_questions(config.split, config.questions)
    parts = []
    starts = range(0, len(questions), config.batch_size)
    for index, start in enumerate(tqdm(starts, desc="vica layers", leave=False)):
        if not store.has_part("questions", index):
            chunk = questions[start:start + config.batch_size]
            batches = probe_batches(loaded, chunk)
            table = measure_cuts(loaded, batches.training, batches.labels)
            table.insert(0, "question", table.pop("row") + start)
            table.insert(1, "type", [chunk[row][1].type for row in table["question"] - start])
            store.write_part("questions", index, table)
        parts.append(store.read_part("questions", index)[0])
    per_question = pd.concat(parts, ignore_index=True)
    layers = layer_table(per_question)
    store.write_table("per_question", per_question)
    store.write_table("layers", layers)
    agreement = proxy_agreement(layers)
    store.write_table("agreement", agreement)
    intact = per_question.drop_duplicates("question")
    loss = {int(layer): float(value) for layer, value in zip(layers["layer"], layers[DIRECT])}
    summary = {
        "questions": len(questions), "split": config.split,
        "intact": {"loss": float(intact["intact_loss"].mean()), "accuracy": float(intact["intact_correct"].mean())},
        "text_blind": {"loss": float(intact["blind_loss"].mean()), "accuracy": float(intact["blind_correct"].mean())},
        "ranking": sorted(loss, key=lambda layer: (-loss[layer], layer)),
        "chosen": {k: choose_layers(loss, k) for k in COMPARISON_KS if k <= num_layers},
        "agreement": agreement.to_dict("records"),
        "comparison_sets": comparison_sets(num_layers, [k for k in COMPARISON_KS if k <= num_layers], loss),
    }
    store.write_json("summary", summary)
    store.finish(num_llm_layers=num_layers)
    return summary
