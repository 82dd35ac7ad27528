"""Streaming evaluation: translate the task's test pairs under wait-k for several k and offline; sacreBLEU
corpus BLEU, AL and LAAL in source words.

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
from efficient_models.streaming.task import Pair
from workbench.errors import InputError

OFFLINE = None  # in a list of wait-k values: full-sentence translation
READ_EVERYTHING = 10**9  # a wait-k so large that every word sees the whole source
LENGTH_BIN = 10
LAYOUT_NAMES = {"group": "group positions", "interleaved": "interleaved positions", "reencode": "re-encoding",
                "fix-none": "arrival order, nothing fixed", "fix-input": "input attention fixed",
                "fix-output": "output attention fixed", "fix-positions": "positions fixed"}


@dataclass(frozen=True)
class Translation:
    hypothesis: str
    delays: list[int]  # per hypothesis word
    source_words: int
    reference: str
    generated_tokens: int
    forward_tokens: int  # tokens the model ran to produce them (re-feeds and re-encodings included)

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
                       result.forward_tokens)


def compute_by_source_length(translations: Sequence[Translation]) -> dict[str, float]:
    """Forward tokens per generated token, by source length (10-word bins): flat when nothing is re-encoded.

    A proxy for FLOPs per emitted token: it counts the per-token work (projections, MLP), not attention's
    term that grows with the context for every layout alike.
    """
    bins: dict[str, list[Translation]] = {}
    for translation in translations:
        low = (translation.source_words - 1) // LENGTH_BIN * LENGTH_BIN + 1
        bins.setdefault(f"{low}-{low + LENGTH_BIN - 1}", []).append(translation)
    return {name: sum(t.forward_tokens for t in group) / max(1, sum(t.generated_tokens for t in group))
            for name, group in sorted(bins.items(), key=lambda item: int(item[0].split("-")[0]))}


def score(translations: Sequence[Translation]) -> dict:
    import sacrebleu

    bleu = sacrebleu.corpus_bleu([t.hypothesis for t in translations], [[t.reference for t in translations]])
    forward = sum(t.forward_tokens for t in translations) / max(1, sum(t.generated_tokens for t in translations))
    return {"BLEU": bleu.score, **corpus_latency([t.lagged for t in translations]),
            "forward_tokens_per_token": forward, "compute_by_source_length": compute_by_source_length(translations)}


def evaluate(model, tokenizer, config: StreamingConfig, pairs: Sequence[Pair], wait_ks: Sequence[int | None],
             layouts: Sequence[str] = ("group",), model_name: str = "") -> list[dict]:
    """One row per layout and policy: method, policy, pairs, BLEU, AL, LAAL and compute."""
    if not pairs:
        raise InputError("no test pairs to evaluate")
    unknown = [layout for layout in layouts if layout not in LAYOUT_NAMES]
    if unknown:
        raise InputError(f"unknown layout {unknown[0]!r}; choose from {', '.join(LAYOUT_NAMES)}")
    chat = ChatFormat.from_tokenizer(tokenizer, config.instruction)
    rows = []
    for layout in layouts:
        for wait_k in wait_ks:
            policy = StreamingPolicy(wait_k=READ_EVERYTHING if wait_k is OFFLINE else wait_k,
                                     target_offset=config.target_offset,
                                     max_tokens_per_write=config.max_tokens_per_write,
                                     max_lag_words=config.max_lag_words)
            name = f"{layout} {'offline' if wait_k is OFFLINE else f'wait-{wait_k}'}"
            translations = [translate(model, tokenizer, chat, pair, policy, layout)
                            for pair in tqdm(pairs, desc=name, unit="pair", leave=False)]
            rows.append({"method": f"{LAYOUT_NAMES[layout]}{model_name}",
                         "policy": "offline" if wait_k is OFFLINE else f"wait-{wait_k}", "pairs": len(pairs),
                         **score(translations),
                         "example": {"source": pairs[0].source, "hypothesis": translations[0].hypothesis}})
    return rows


def load_streaming_run(run_dir: Path):
    """(config, model with its LoRA merged, tokenizer) of a finished `wb train streaming` run."""
    from efficient_models.registry import run_config
    from workbench.models.causal_lm import load_causal_lm

    config = run_config(run_dir, "streaming")
    lora = Path(run_dir) / "lora"
    if not (lora / "adapter_config.json").is_file():
        raise InputError(f"{run_dir} has no trained adapter (lora/); the run has not finished")
    import peft

    model, tokenizer = load_causal_lm(config.model)
    return config, peft.PeftModel.from_pretrained(model, lora).merge_and_unload().eval(), tokenizer
