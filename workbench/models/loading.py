"""`load_model`: a Hugging Face vision-language model, its processor and its architecture adapter.

`load_model("default")` gives the embedded default model (built from packaged weights, no
network); any other name is a local folder or a Hugging Face id of a supported family. Folders
of every vintage load: the processor is built for images and text only (no torchvision), and
what an older folder leaves out is completed from the model (see `ArchitectureAdapter.complete_processor`).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from workbench.models.adapter import ArchitectureAdapter, adapter_class_for, adapter_for
from workbench.errors import ModelLoadError

DEFAULT_MODEL_NAME = "default"


@dataclass
class LoadedModel:
    """A model ready for analysis: the HF model (eval mode), its processor and adapter."""

    model: PreTrainedModel
    processor: Any
    adapter: ArchitectureAdapter
    name: str
    notes: list[str] = field(default_factory=list)  # user-facing remarks, e.g. an untrained projector
    load_seconds: float = 0.0

    @classmethod
    def from_model(cls, model: PreTrainedModel, processor: Any = None, name: str = "custom") -> LoadedModel:
        """Wrap a model built in code (tests, notebooks) without loading anything."""
        return cls(model=model.eval(), processor=processor, adapter=adapter_for(model), name=name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The most tokens the LLM reads (its config's `max_position_embeddings`), when the config says."""
        text_config = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(text_config, "max_position_embeddings", None)

    def generate_text(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> list[str]:
        """Greedy continuations of a left-padded batch, decoded without the prompt or special tokens."""
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        # Left padding puts every prompt's last token in the same column, so new tokens start after it;
        # rows that stopped early are filled with the pad token, which decoding skips as special.
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    @functools.cached_property
    def nnsight(self):
        """The model wrapped for tracing; built on first use (analyses need it, training does not)."""
        from nnsight import NNsight

        return NNsight(self.model)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_attn_implementation(device: str) -> str:
    """FlashAttention-2 where it is installed on a GPU, PyTorch SDPA otherwise."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(
    name_or_path: str = DEFAULT_MODEL_NAME,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    default_weights: Path | None = None,
) -> LoadedModel:
    """Load a supported vision-language model; raise `ModelLoadError` with a one-line reason.

    `default_weights`: a `wb train default` run folder whose projector and LoRA the default model applies
    instead of the shipped ones (to evaluate a run before installing it).
    """
    device = device or default_device()
    attn_implementation = attn_implementation or default_attn_implementation(device)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    started = time.perf_counter()
    if name_or_path == DEFAULT_MODEL_NAME:
        from workbench.models.default_model import DEFAULT_WEIGHTS_DIR, load_default_model

        if default_weights is not None and not (Path(default_weights) / "projector.safetensors").is_file():
            raise ModelLoadError(f"{default_weights} holds no trained projector (projector.safetensors); "
                                 "give a finished `wb train default` run folder")
        model, processor, info = load_default_model(dtype=dtype, attn_implementation=attn_implementation,
                                                    weights_dir=Path(default_weights or DEFAULT_WEIGHTS_DIR))
        notes = [info.warning] if info.warning else []
        if default_weights is not None:
            notes.append(f"the default model with the weights of {default_weights}, not the shipped ones")
    elif default_weights is not None:
        raise ModelLoadError(f"weights from {default_weights} apply to the default model only, not {name_or_path!r}")
    else:
        model, processor = _load_pretrained(name_or_path, dtype, attn_implementation)
        notes = []
    model = model.to(device).eval()
    adapter = adapter_for(model)
    if name_or_path != DEFAULT_MODEL_NAME:  # the default model's processor is built to match it
        adapter.complete_processor(processor)
    return LoadedModel(
        model=model,
        processor=processor,
        adapter=adapter,
        name=name_or_path,
        notes=notes,
        load_seconds=time.perf_counter() - started,
    )


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith(".")


def _load_pretrained(name_or_path: str, dtype: torch.dtype, attn_implementation: str):
    if not Path(name_or_path).exists() and not _looks_like_hub_id(name_or_path):
        raise ModelLoadError(f"cannot load model {name_or_path!r}: no such folder, and it is not a hub id (org/name)")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        if Path(name_or_path).is_dir():
            raise ModelLoadError(f"cannot load model folder {name_or_path}: its config.json cannot be read "
                                 f"({type(error).__name__}: {_reason(error)})") from None
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: not a local model folder, and the hub has no such id "
            f"or cannot be reached ({type(error).__name__}); pass a local path, a valid id, or 'default'"
        ) from None
    adapter_cls = adapter_class_for(config.model_type)
    ArchitectureAdapter._find_image_token_id(config)  # refuse text-only models before loading weights
    try:  # the processor first: a missing tokenizer should not wait for the weights to load
        processor = _image_text_processor_class(config.model_type).from_pretrained(name_or_path)
    except (OSError, ValueError, ImportError) as error:
        raise ModelLoadError(f"cannot load model {name_or_path!r} (its tokenizer or image processor): "
                             f"{_reason(error)}") from None
    model_cls = getattr(transformers, adapter_cls.model_classes[config.model_type])
    try:
        model = model_cls.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError, ImportError) as error:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {_reason(error)}") from None
    _fill_generation_token_ids(model)
    return model, processor


# SmolVLM's processor is Idefics3's with video added: it lays out images the same, but needs `num2words` and a
# video processor passed to its `__init__`, and does not split a flat list of images over the prompts.
_IMAGE_TEXT_PROCESSORS = {"smolvlm": "Idefics3Processor"}


def _image_text_processor_class(model_type: str) -> type:
    """The family's processor class, without its video processor where it has one: transformers builds that
    one on torchvision, which the workbench's install must not have and its image-only work never uses.
    Its image processor then resolves to the PIL backend."""
    processor_class = getattr(transformers, _IMAGE_TEXT_PROCESSORS.get(model_type, PROCESSOR_MAPPING_NAMES[model_type]))
    attributes = processor_class.get_attributes()
    if "video_processor" not in attributes:
        return processor_class
    # `ProcessorMixin` loads, checks and stores exactly the sub-processors `get_attributes` names, and the
    # family's `__init__` already defaults `video_processor` to None.
    image_text = [name for name in attributes if name != "video_processor"]
    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(lambda cls: image_text)})


def _fill_generation_token_ids(model: PreTrainedModel) -> None:
    """Take special token ids the generation config lacks from the model config. llava-hf folders saved before
    `generation_config.json` existed keep the end-of-sequence id only in their text config, and generation
    cannot stop without it."""
    generation = model.generation_config
    configs = (model.config, model.config.get_text_config())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, key, None) is None:
            setattr(generation, key, next((getattr(c, key) for c in configs if getattr(c, key, None) is not None),
                                          None))


def _reason(error: Exception) -> str:
    """One line for the user: the error's first non-empty line (transformers' ImportErrors start with a
    newline), naming the missing package for an ImportError that says it only in its attributes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    if len(lines) > 1 and ". " in line:  # transformers wraps its messages mid-sentence: end at a full stop
        line = line[: line.rindex(". ") + 1]
    if isinstance(error, ImportError) and error.name and error.name not in line:
        return f"missing package {error.name!r}: {line}"
    return line
