"""Architecture adapters: where each part of a vision-language model lives, by name.

An adapter maps one Hugging Face model family onto the components every analysis and
efficient model needs (vision tower and its layers, projector, LLM decoder layers, input
embeddings, final norm, lm_head, image-token id) and knows how the family lays out visual
tokens: which positions hold them and each image's patch grids (rows x cols; one per image in most
families, several for anyres tiles).

Components are given as dotted module paths, so the same adapter navigates both the
torch model and an nnsight envoy wrapped around it (see `resolve`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from workbench.errors import ModelLoadError
from workbench.flops import VisionShape

_ADAPTERS: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    """Class decorator: make `cls` the adapter for each of its `model_classes` model types."""
    for model_type in cls.model_classes:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class_for(model_type: str) -> type[ArchitectureAdapter]:
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ModelLoadError(
            f"unsupported architecture model_type={model_type!r}; "
            f"supported: {', '.join(supported_model_types())}"
        ) from None


def adapter_for(model: PreTrainedModel) -> ArchitectureAdapter:
    """The adapter for a loaded model, chosen by its config's model_type."""
    return adapter_class_for(model.config.model_type)(model)


def resolve(root: Any, dotted_path: str) -> Any:
    """Follow a dotted path of attributes and integer indices (`a.layers.3`) from `root`."""
    node = root
    for part in dotted_path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@dataclass(frozen=True)
class ImageLayout:
    """Where one patch grid of an image sits in a batch: its row, token positions and shape. Most families give
    an image one grid; LLaVA-NeXT's anyres gives it two (the whole image, then its tiles), each over the image."""

    sample: int
    positions: torch.Tensor  # token positions in the row, row-major over the grid
    rows: int
    cols: int
    image: int  # which image of the batch (input order); an image's grids are consecutive layouts

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class ImageTokens:
    """How one image's run of visual tokens divides into patch grids: the grids in order, and which tokens are
    grid cells. The others (LLaVA-NeXT's row-end newline tokens) are visual tokens in no grid."""

    grids: tuple[tuple[int, int], ...]
    is_cell: torch.Tensor | None = None  # [tokens] bool; None: every token is a cell

    @property
    def num_tokens(self) -> int:
        return sum(rows * cols for rows, cols in self.grids) if self.is_cell is None else len(self.is_cell)


@dataclass(frozen=True)
class NonTextRows:
    """Rows of the input-embedding matrix that are no real text token, and why: never nearest neighbours."""

    rows: range
    reason: str

    def describe(self) -> str:
        """E.g. "32000-32063 (why)", or "none"."""
        if not self.rows:
            return "none"
        span = str(self.rows.start) if len(self.rows) == 1 else f"{self.rows.start}-{self.rows.stop - 1}"
        return f"{span} ({self.reason})"


class ArchitectureAdapter(ABC):
    """Names the parts of one model family. Subclasses set the paths and the grid logic."""

    # model_type -> the transformers class that loads it
    model_classes: ClassVar[dict[str, str]]
    vision_tower_path: ClassVar[str]
    projector_path: ClassVar[str]
    language_model_path: ClassVar[str]

    # Whether the token-schedule engine can run this family's LLM: it needs the LLM's input embeddings
    # (`input_embeddings`) and each prompt token's rotary position ids (`position_ids`) built outside the model.
    token_schedules: ClassVar[bool] = False
    # Whether the vision tower, called alone on pixel values, returns its per-layer `hidden_states` over a
    # square patch grid (the vision-layers analysis reads them); Qwen2-VL's tower takes patches and grids.
    tower_hidden_states: ClassVar[bool] = True

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.image_token_id = self._find_image_token_id(model.config)
        self.vision_layers_path = f"{self.vision_tower_path}.{self._find_vision_layers_name()}"

    # ---- components -------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return resolve(self.model, self.vision_tower_path)

    @property
    def vision_layers(self) -> nn.ModuleList:
        return resolve(self.model, self.vision_layers_path)

    @property
    def projector(self) -> nn.Module:
        return resolve(self.model, self.projector_path)

    @property
    def language_model(self) -> nn.Module:
        return resolve(self.model, self.language_model_path)

    @property
    def llm_layers_path(self) -> str:
        return f"{self.language_model_path}.layers"

    @property
    def llm_layers(self) -> nn.ModuleList:
        return resolve(self.model, self.llm_layers_path)

    @property
    def final_norm_path(self) -> str:
        return f"{self.language_model_path}.norm"

    @property
    def final_norm(self) -> nn.Module:
        return resolve(self.model, self.final_norm_path)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def non_text_vocabulary_rows(self, tokenizer: Any) -> NonTextRows:
        """Rows past the tokenizer (from `len(tokenizer)` on): padding that rounds the matrix up, which no
        token maps to and whose embedding was never trained."""
        return NonTextRows(range(len(tokenizer), self.embed_tokens.weight.shape[0]), "rows no tokenizer entry maps to")

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def lm_head_path(self) -> str:
        return self.path_of(self.lm_head)

    def path_of(self, module: nn.Module) -> str:
        """The dotted path of one of the model's submodules."""
        return next(name for name, candidate in self.model.named_modules() if candidate is module)

    @property
    def num_llm_layers(self) -> int:
        return len(self.llm_layers)

    @property
    def num_vision_layers(self) -> int:
        return len(self.vision_layers)

    # ---- processor --------------------------------------------------------------------
    def complete_processor(self, processor: Any) -> None:
        """Set, from the model, what an older saved processor config leaves out or gets wrong, so that the
        processor lays out the visual tokens the model expects; a family whose processors always say it
        needs nothing here."""

    # ---- visual tokens ----------------------------------------------------------------
    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean [batch, seq] mask of visual-token positions, from the image-token id."""
        return input_ids == self.image_token_id

    @abstractmethod
    def image_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        """(rows, cols) of every patch grid in the batch, in input order (one per image in most families)."""

    def image_tokens(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageTokens]:
        """Each image's visual tokens, in input order: one grid of cells per image unless a family says more."""
        return [ImageTokens(grids=(grid,)) for grid in self.image_grids(inputs)]

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageLayout]:
        """Assign the batch's images, in order, to the runs of visual tokens in each row; one layout per grid."""
        mask = self.visual_token_mask(inputs["input_ids"])
        images = enumerate(self.image_tokens(inputs))
        layouts = []
        for sample, row in enumerate(mask):
            positions = row.nonzero().flatten()
            start = 0
            while start < len(positions):
                image, tokens = next(images, (None, None))
                if tokens is None or start + tokens.num_tokens > len(positions):
                    raise ValueError("visual tokens in input_ids do not match the images' patch grids")
                run = positions[start : start + tokens.num_tokens]
                cells = run if tokens.is_cell is None else run[tokens.is_cell.to(run.device)]
                for rows, cols in tokens.grids:
                    layouts.append(ImageLayout(sample, cells[: rows * cols], rows, cols, image))
                    cells = cells[rows * cols :]
                start += tokens.num_tokens
        if next(images, None) is not None:
            raise ValueError("visual tokens in input_ids do not match the images' patch grids")
        return layouts

    def flatten_projector_input(self, features: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Projector input as [num_visual_tokens, d_in] for the batch `inputs`: the vision features each LLM token
        is made from."""
        return features.reshape(-1, features.shape[-1])

    def flatten_projector_output(self, output: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Projector output as [num_visual_tokens, d] for the batch `inputs`, in the order the tokens are scattered."""
        return output.reshape(-1, output.shape[-1])

    def input_embeddings(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The LLM's input embeddings [batch, seq, d]: token embeddings, projector outputs at the image tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not build input embeddings outside the model")

    def scatter_image_features(self, embeddings: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor
                               ) -> torch.Tensor:
        """The token `embeddings` of `input_ids` with `features` [visual tokens, d] put at the image tokens, in order.
        Callers embed the tokens before they run the vision tower: hooks on `embed_tokens` mark a new call (internal
        fusion clears the tower features it kept from the last one)."""
        visual = self.visual_token_mask(input_ids)
        if int(visual.sum()) != features.shape[0]:
            raise ValueError(f"{int(visual.sum())} image tokens in the prompt but {features.shape[0]} image features")
        return embeddings.masked_scatter(visual[..., None], features.to(embeddings.dtype))

    def position_ids(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each prompt token's rotary position ids as the model numbers them: [batch, seq], one per real token
        (left padding at 0). A family with multi-axis rotary returns [axes, batch, seq]."""
        real = inputs.get("attention_mask")
        real = torch.ones_like(inputs["input_ids"]) if real is None else real
        return (real.long().cumsum(1) - 1).clamp_min(0)

    def vision_shape(self, image_size: tuple[int, int] | None) -> tuple[VisionShape, int]:
        """The vision tower's shape for FLOPs counts on images of `image_size` (height, width; None: the config's),
        and the visual tokens one such image gives: a ViT with one token per patch, whose CLS token LLaVA's
        "full" feature selection keeps."""
        config = self.model.config
        vision = VisionShape.from_config(config.vision_config, image_size)
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return vision, vision.patches + int(full and vision.class_token)

    # ---- helpers ----------------------------------------------------------------------
    @staticmethod
    def _find_image_token_id(config: Any) -> int:
        """The image-token id, checked to be a real token of the model's vocabulary."""
        name = getattr(config, "name_or_path", "") or config.model_type
        token_id = next((getattr(config, key) for key in ("image_token_id", "image_token_index")
                         if getattr(config, key, None) is not None), None)
        vocab_size = config.get_text_config().vocab_size
        if token_id is None or not 0 <= int(token_id) < vocab_size:
            raise ModelLoadError(
                f"model {name!r} has no image token: config.image_token_id={token_id} is not in its "
                f"vocabulary of {vocab_size} tokens, so it cannot take images"
            )
        return int(token_id)

    def _find_vision_layers_name(self) -> str:
        """The vision tower's stack of transformer blocks: its longest ModuleList."""
        lists = [(len(m), name) for name, m in self.vision_tower.named_modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise ModelLoadError(f"vision tower {type(self.vision_tower).__name__} has no layer list")
        return max(lists)[1]
