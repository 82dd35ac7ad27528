"""Text-only causal LMs, for the methods that run on a language model alone (streaming, on-policy SFT).

`default` is the default model's language model, SmolLM2-135M-Instruct from its packaged GGUF, rebuilt as a plain
float32 model (one still marked GGUF-quantized cannot be saved); anything else is a local Hugging Face causal LM
folder, loaded as it is, with no forked modeling code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from workbench.errors import InputError

DEFAULT = "default"


def load_causal_lm(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (float32, eval mode) and tokenizer of `source`; an unusable source is one `InputError` line."""
    if str(source) == DEFAULT:
        return default_language_model()
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise InputError(f"{source} is neither 'default' nor a Hugging Face model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise InputError(f"{source} is not a causal LM folder: {str(error).strip().splitlines()[0]}") from None
    return model.eval(), tokenizer


def default_language_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the packaged GGUF, as a plain float32 `LlamaForCausalLM`."""
    from transformers import LlamaForCausalLM

    from workbench.models.default_model import LANGUAGE_SOURCE, load_smollm2, packaged_file, plain_text_config

    quantized, tokenizer = load_smollm2(packaged_file(*LANGUAGE_SOURCE))
    model = LlamaForCausalLM(plain_text_config(quantized))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return model.eval(), tokenizer
