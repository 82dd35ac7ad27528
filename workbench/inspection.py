"""A first look at how a model sees one image: what `wb inspect` prints.

Counts the visual tokens and their grids, generates the model's answer, traces every LLM layer
to compare visual and text token norms, and reads a few visual tokens against the vocabulary
(nearest input embeddings by cosine similarity, as EmbedLens does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from workbench.models.inputs import build_inputs, check_fits_context
from workbench.models.loading import LoadedModel
from workbench.tracing import Capture, CaptureSpec, capture


@dataclass
class LayerNorms:
    layer: str  # "input" for the LLM's input embeddings, else the decoder layer index
    visual: float
    text: float


@dataclass
class TokenNeighbours:
    index: int  # grid-cell index within the image: row-major, grid after grid
    grid: int  # which of the image's grids (0 where it has one)
    row: int
    col: int
    norm: float
    neighbours: list[tuple[str, float]]  # (vocabulary token, cosine similarity), best first


@dataclass
class InspectReport:
    model: str
    prompt: str
    num_visual_tokens: int  # every visual token, row-end tokens in no grid included
    grid: tuple[int, int]  # the image's first grid
    grids: list[tuple[int, int]]  # all its grids (LLaVA-NeXT: the whole image, then its tiles)
    non_grid_tokens: int  # visual tokens in no grid cell (LLaVA-NeXT's row ends)
    answer: str
    layer_norms: list[LayerNorms]
    nearest_tokens: list[TokenNeighbours]
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def nearest_vocabulary(
    vectors: torch.Tensor, embedding_matrix: torch.Tensor, top_k: int, exclude: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (cosine similarity, token id) of each vector against every vocabulary embedding.

    `exclude` ids are never neighbours: pass the image-token id, whose embedding the LLM never
    sees (it is replaced by visual tokens) and which, initialised near the mean embedding, would
    otherwise be a hub near everything."""
    similarity = F.normalize(vectors.float(), dim=-1) @ F.normalize(embedding_matrix.float(), dim=-1).T
    if exclude:
        similarity[:, list(exclude)] = -float("inf")
    return similarity.topk(top_k, dim=-1)


def vocabulary_neighbours(loaded: LoadedModel, vectors: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_vocabulary` against the LLM's input embeddings, on CPU, never returning the image token
    or a row that is no real text token (`ArchitectureAdapter.non_text_vocabulary_rows`)."""
    adapter = loaded.adapter
    embedding_matrix = adapter.embed_tokens.weight.detach()
    excluded = [adapter.image_token_id, *adapter.non_text_vocabulary_rows(loaded.processor.tokenizer).rows]
    with torch.no_grad():
        scores, ids = nearest_vocabulary(vectors.to(embedding_matrix.device), embedding_matrix, top_k,
                                         exclude=excluded)
    return scores.cpu(), ids.cpu()


def spread_indices(count: int, how_many: int) -> list[int]:
    """`how_many` token indices spread evenly over `count` tokens (always including the first and last)."""
    if how_many >= count:
        return list(range(count))
    return torch.linspace(0, count - 1, how_many).round().long().tolist()


def mean_norms(traced: Capture) -> list[LayerNorms]:
    rows = [("input", traced.embeddings)] + [(str(layer), traced.hidden[layer]) for layer in sorted(traced.hidden)]
    visual, text = traced.visual_mask, traced.text_mask
    return [
        LayerNorms(name, float(states[visual].norm(dim=-1).mean()), float(states[text].norm(dim=-1).mean()))
        for name, states in rows
    ]


def inspect_image(
    loaded: LoadedModel,
    image: Image.Image,
    prompt: str,
    *,
    num_tokens: int = 5,
    top_k: int = 5,
    max_new_tokens: int = 40,
) -> InspectReport:
    inputs = build_inputs(loaded.processor, [image], [prompt], device=loaded.device)
    check_fits_context(inputs, loaded.context_length, max_new_tokens)
    traced = capture(loaded, inputs, CaptureSpec(projector=True, embeddings=True, llm_layers="all"))
    layouts = traced.layouts  # the one image's grids
    tokenizer = loaded.processor.tokenizer
    # Every grid cell of the image, grid after grid: (grid, cell within it), and where it sits in `projector`.
    cells = [(grid, cell) for grid, layout in enumerate(layouts) for cell in range(layout.num_tokens)]
    visual_index = torch.cat([traced.visual_indices(layout) for layout in layouts])
    chosen = spread_indices(len(cells), num_tokens)
    vectors = traced.projector[visual_index[chosen]]
    scores, ids = vocabulary_neighbours(loaded, vectors, top_k)
    nearest = []
    for index, vector, row_scores, row_ids in zip(chosen, vectors, scores, ids):
        grid, cell = cells[index]
        nearest.append(TokenNeighbours(
            index=index,
            grid=grid,
            row=cell // layouts[grid].cols,
            col=cell % layouts[grid].cols,
            norm=float(vector.norm()),
            neighbours=[(tokenizer.decode([int(i)]), round(float(s), 4)) for s, i in zip(row_scores, row_ids)],
        ))
    num_visual_tokens = int(traced.visual_mask.sum())
    return InspectReport(
        model=loaded.name,
        prompt=prompt,
        num_visual_tokens=num_visual_tokens,
        grid=traced.grids[0],
        grids=traced.grids,
        non_grid_tokens=num_visual_tokens - len(cells),
        answer=loaded.generate_text(inputs, max_new_tokens)[0],
        layer_norms=mean_norms(traced),
        nearest_tokens=nearest,
        notes=list(loaded.notes),
    )
