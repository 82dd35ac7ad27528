"""Where a reasoning run's language model comes from and goes: any Hugging Face causal LM.

A source is "default" (SmolLM2-135M-Instruct from its packaged GGUF), a Hugging Face model folder, or a
run folder of `wb train reasoner` / `wb train onpolicy-sft`, whose trained model sits in `model/`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workbench.errors import InputError
from workbench.models.causal_lm import load_causal_lm

RUN_MODEL = "model"  # a run folder's trained model, written when the run finishes


def load_reasoning_model(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (float32, eval mode) and tokenizer of `source`: a run folder's `model/`, else as
    `load_causal_lm` reads it; an unusable source is one `InputError` line."""
    trained = Path(source) / RUN_MODEL
    try:
        return load_causal_lm(trained if trained.is_dir() else source)
    except InputError as error:
        raise InputError(f"{error}; nor is it a finished reasoning run (no {RUN_MODEL}/)") from None


def save_causal_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path:
    """Write the trained model and its tokenizer (safetensors) to the run folder's `model/`."""
    folder = Path(run_dir) / RUN_MODEL
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
