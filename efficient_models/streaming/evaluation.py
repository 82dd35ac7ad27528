"""Streaming evaluation: translate the task's test pairs under wait-k for several k and offline; sacreBLEU
corpus BLEU, AL and LAAL in source words, and the decoder FLOPs per emitted token (by source length too).

Latency is counted per word of the decoded hypothesis (split on whitespace, as SimulEval counts words): a
word's delay is the number of source words read when its first token was chosen. Offline translation reads
the whole source before writing (its AL is the source length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from efficient_models.streaming.chat_format import ChatFormat
from efficient_models.streaming.config import StreamingConfig
from efficient_models.streaming.decoding import StreamingPolicy, stream_translate
from efficient_models.streaming.latency import Lagged, corpus_latency
from efficient_models.streaming.mask import READ_EVERYTHING
from efficient_models.streaming.task import Pair
from workbench.errors import InputError
from workbench.flops import DecoderShape

OFFLINE = None  # in a list of wait-k values: full-sentence translation
LENGTH_BIN = 10
LAYOUT_NAMES = {"group": "group positions", "interleaved": "interleaved positions", "reencode": "re-encoding",
                "fix-none": "arrival order, nothing fixed", "fix-input": "input attention fixed",
                "fix-output": "output attention fixed", "fix-positions": "positions fixed"}
# How a model is decoded by default: as it was trained (the batch model streams by re-encoding, baseline a).
DECODED_AS_TRAINED = {"group": "group", "batch": "reencode", "interleaved": "interleaved"}


@dataclass(frozen=True)
class Translation:
    hypothesis: str
    delays: list[int]  # per hypothesis word
    source_words: int
    reference: str
    generated_tokens: int
    forward_tokens: int  # tokens the model ran to produce them (re-feeds and re-encodings included)
    attended_pairs: int  # query-key pairs their attention used

    @property
    def lagged(self) -> Lagged:
        return Lagged(self.delays, self.source_words, len(self.reference.split()))


def word_delays(tokenizer, generated: Sequence[int], token_delays: Sequence[int]) -> tuple[str, list[int]]:
    """The decoded text and, per whitespace word of it, the delay of the token that started it."""
    delays: list[int] = []
    for end, delay in enumerate(token_delays, start=1):
        words = len(tokenizer.decode(generated[:end], skip_special_tokens=True).split())
        delays += [delay] * (words - len(delays))
    return tokenizer.decode(generated, skip_special_tokens=True).strip(), delays


def translate(model, tokenizer, chat: ChatFormat, pair: Pair, policy: StreamingPolicy,
              layout: str = "group") -> Translation:
    source = chat.source_group(tokenizer, pair.source_words)
    result = stream_translate(model, source, chat.prefix, chat.end_token, chat.boundaries, policy, layout)
    generated = result.target[len(chat.prefix):]
    if generated and generated[-1] == chat.end_token:
        generated = generated[:-1]
    # A generated token was chosen from the logits of the token before it: that token's view of the source.
    seen = result.visible[len(chat.prefix) - 1:]
    token_delays = [min(units - 1, source.num_words) for units in seen[:len(generated)]]
    text, delays = word_delays(tokenizer, generated, token_delays)
    return Translation(text, delays, source.num_words, pair.target, len(result.target) - len(chat.prefix),
                       result.compute.tokens, result.compute.attended_pairs)


@dataclass(frozen=True)
class DecoderCost:
    """FLOPs of a Llama-style model's decoder layers (projections, MLP, attention; `workbench.flops`), counted
    from its config. The LM head is left out: it runs once per emitted token, whatever the layout."""

    shape: DecoderShape
    layers: int

    @classmethod
    def of(cls, model) -> DecoderCost:
        gated = any(name.endswith("gate_proj") for name, _ in model.named_modules())
        return cls(DecoderShape.from_config(model.config, gated_mlp=gated), model.config.num_hidden_layers)

    def flops(self, tokens: int, attended_pairs: int) -> float:
        return self.layers * (self.shape.linear_flops(tokens) + self.shape.attention_pair_flops(attended_pairs))

    def gflops_per_token(self, translations: Sequence[Translation]) -> float:
        """Decoder GFLOPs per generated token over `translations`."""
        flops = sum(self.flops(t.forward_tokens, t.attended_pairs) for t in translations)
        return flops / 1e9 / max(1, sum(t.generated_tokens for t in translations))


def compute_by_source_length(translations: Sequence[Translation], cost: DecoderCost) -> dict[str, float]:
    """Decoder GFLOPs per generated token, by source length (10-word bins): flat when nothing is re-encoded
    (but for attention's term, which grows with the context in every layout)."""
    bins: dict[str, list[Translation]] = {}
    for translation in translations:
        low = (translation.source_words - 1) // LENGTH_BIN * LENGTH_BIN + 1
        bins.setdefault(f"{low}-{low + LENGTH_BIN - 1}", []).append(translation)
    return {name: cost.gflops_per_token(group)
            for name, group in sorted(bins.items(), key=lambda item: int(item[0].split("-")[0]))}


def score(translations: Sequence[Translation], cost: DecoderCost) -> dict:
    import sacrebleu

    bleu = sacrebleu.corpus_bleu([t.hypothesis for t in translations], [[t.reference for t in translations]])
    forward = sum(t.forward_tokens for t in translations) / max(1, sum(t.generated_tokens for t in translations))
    return {"BLEU": bleu.score, **corpus_latency([t.lagged for t in translations]),
            "GFLOPs_per_token": cost.gflops_per_token(translations), "forward_tokens_per_token": forward,
            "compute_by_source_length": compute_by_source_length(translations, cost)}


def evaluate(model, tokenizer, config: StreamingConfig, pairs: Sequence[Pair], wait_ks: Sequence[int | None],
             layouts: Sequence[str] = ("group",), model_name: str = "", progress: bool = True) -> list[dict]:
    """One row per layout and policy: method, policy, pairs, BLEU, AL, LAAL and compute."""
    if not pairs:
        raise InputError("no test pairs to evaluate")
    unknown = [layout for layout in layouts if layout not in LAYOUT_NAMES]
    if unknown:
        raise InputError(f"unknown layout {unknown[0]!r}; choose from {', '.join(LAYOUT_NAMES)}")
    chat = ChatFormat.from_tokenizer(tokenizer, config.instruction)
    cost = DecoderCost.of(model)
    rows = []
    for layout in layouts:
        for wait_k in wait_ks:
            policy = StreamingPolicy(wait_k=READ_EVERYTHING if wait_k is OFFLINE else wait_k,
                                     target_offset=config.target_offset,
                                     max_tokens_per_write=config.max_tokens_per_write,
                                     max_lag_words=config.max_lag_words)
            name = f"{layout} {'offline' if wait_k is OFFLINE else f'wait-{wait_k}'}"
            translations = [translate(model, tokenizer, chat, pair, policy, layout)
                            for pair in tqdm(pairs, desc=name, unit="pair", leave=False, disable=not progress)]
            rows.append({"method": f"{LAYOUT_NAMES[layout]}{model_name}",
                         "policy": "offline" if wait_k is OFFLINE else f"wait-{wait_k}", "pairs": len(pairs),
                         **score(translations, cost),
                         "example": {"source": pairs[0].source, "hypothesis": translations[0].hypothesis}})
    return rows


def trained_name(config: StreamingConfig) -> str:
    """How a run's model was trained, for the table: "group-trained wait-3", "batch-trained",
    "group-trained wait-1/3/5/7/offline"."""
    if config.training_layout == "batch":
        return "batch-trained"
    return f"{config.training_layout}-trained {config.trained_policies()}"


def finished_run_config(run_dir: Path) -> StreamingConfig:
    """The config of a finished `wb train streaming` run; a folder that is not one is one `InputError` line."""
    from efficient_models.registry import run_config

    config = run_config(run_dir, "streaming")
    if not (Path(run_dir) / "lora" / "adapter_config.json").is_file():
        raise InputError(f"{run_dir} has no trained adapter (lora/); the run has not finished")
    return config


def held_out_pairs(run_dir: Path, n: int) -> list[Pair]:
    """The first `n` pairs of the test split of the task the run trained on (fixed by its task seed)."""
    import yaml

    from efficient_models.streaming.task import make_splits

    task_seed = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()).get("task_seed", 0)
    return make_splits(seed=task_seed, train_size=0)[1][:n]


def load_streaming_run(run_dir: Path):
    """(config, model with its LoRA merged, tokenizer) of a finished `wb train streaming` run."""
    import peft

    from workbench.models.causal_lm import load_causal_lm

    config = finished_run_config(run_dir)
    model, tokenizer = load_causal_lm(config.model)
    return config, peft.PeftModel.from_pretrained(model, Path(run_dir) / "lora").merge_and_unload().eval(), tokenizer
