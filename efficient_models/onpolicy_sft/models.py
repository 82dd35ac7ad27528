"""Where a reasoning run's language model comes from and goes: any Hugging Face causal LM.

A source is "default" (SmolLM2-135M-Instruct from its packaged GGUF), a Hugging Face model folder, or a
run folder of `wb train reasoner` / `wb train onpolicy-sft`, whose trained model sits in `model/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from workbench.errors import InputError

RUN_MODEL = "model"  # a run folder's trained model, written when the run finishes


def load_causal_lm(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (float32, eval mode) and tokenizer of `source`; an unusable source is one `InputError` line."""
    if str(source) == "default":
        return _default_language_model()
    folder = Path(source)
    if (folder / RUN_MODEL).is_dir():
        folder = folder / RUN_MODEL
    if not (folder / "config.json").is_file():
        raise InputError(f"{source} is neither 'default', a Hugging Face model folder, nor a finished "
                         f"reasoning run (no {RUN_MODEL}/config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _default_language_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2 from the GGUF, rebuilt as a plain float32 model: one still marked GGUF-quantized cannot be saved."""
    from transformers import LlamaForCausalLM

    from workbench.models.default_model import LANGUAGE_SOURCE, load_smollm2, packaged_file, plain_text_config

    quantized, tokenizer = load_smollm2(packaged_file(*LANGUAGE_SOURCE))
    model = LlamaForCausalLM(plain_text_config(quantized))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return model.eval(), tokenizer


def save_causal_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path:
    """Write the trained model and its tokenizer (safetensors) to the run folder's `model/`."""
    folder = Path(run_dir) / RUN_MODEL
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
