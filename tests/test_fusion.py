"""Multi-layer visual feature fusion: named layer sets resolve to the reference's indices; E_D with its extra
columns at zero is the single-layer model; I_D adds at exactly its LLM layer and only at image positions, and
trained from the feature cache it has the live model's loss."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from efficient_models import registry
from efficient_models.fusion.config import FusionConfig
from efficient_models.fusion.cost import fusion_flops
from efficient_models.fusion.input_fusion import fuse_at_input
from efficient_models.fusion.internal_fusion import (
    InternalFusion,
    attach,
    internal_fusion,
    load_internal_fusion,
    save_internal_fusion,
)
from efficient_models.fusion.layer_sets import resolve_layer_set
from efficient_models.fusion.model import FusedModel, fusion_variant
from efficient_models.fusion.training import CachedInternalFusion
from efficient_models.token_schedule.engine import ScheduledLLM
from efficient_models.token_schedule.finetune import ScheduledLoss
from efficient_models.token_schedule.scheduled_model import ScheduledModel
from efficient_models.token_schedule.schedule import dense
from tests.tiny_models import image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.flops import DEFAULT_MODEL_SHAPES, ModelShapes, token_schedule_flops
from workbench.models.loading import LoadedModel
from workbench.store import RunStore
from workbench.training.features import tower_outputs
from workbench.training.sequences import IGNORE_INDEX

CLIP_L_LAYERS, CLIP_L_BASE = 24, -2  # LLaVA-1.5 reads CLIP-L's penultimate layer: hidden_states index 23


def batch():
    """Two left-padded rows with one image each (4 visual tokens), the second shorter."""
    return llava_batch([[5, *image_tokens_llava(), 7, 8, 9], [*image_tokens_llava(), 6]], [1, 1])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# --- layer sets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("single", [18, 23]),
    ("stages", [3, 18, 23]),
    ("former", [list(range(1, 13)), 23]),
    ("latter", [list(range(13, 25)), 23]),
    ("all", [list(range(1, 25)), 23]),
])
def test_named_layer_sets_resolve_to_the_reference_indices_on_clip_l(name, expected):
    assert resolve_layer_set(name, CLIP_L_LAYERS, CLIP_L_BASE) == expected


def test_explicit_layers_get_the_base_last_once_and_negative_indices_count_from_the_end():
    assert resolve_layer_set([-7, 3, 23], CLIP_L_LAYERS, CLIP_L_BASE) == [18, 3, 23]
    assert resolve_layer_set([[4, 2, 2]], 12, -1) == [[2, 4], 12]
    with pytest.raises(InputError, match="outside 0..24"):
        resolve_layer_set([25], CLIP_L_LAYERS, CLIP_L_BASE)
    with pytest.raises(InputError, match="adds no layer"):
        resolve_layer_set([-1], 12, -1)


# --- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ("layers: former\nmode: input\n", "layers 'former' average whole stages"),
    ("layers: fourth\n", "layers"),
    ("layers: [30]\nnum_vision_layers: 24\n", "layer 30 is outside 0..24"),
    ("layers: []\n", "layers is empty"),
    ("layers: stages\nmode: middle\n", "mode"),
])
def test_a_bad_config_is_one_line(tmp_path, body, message):
    path = tmp_path / "fusion.yaml"
    path.write_text("method: fusion\n" + body)
    with pytest.raises(InputError, match=message) as error:
        registry.load_config(path)
    assert "\n" not in str(error.value)


def test_internal_mode_accepts_whole_stages():
    assert FusionConfig(layers="former", mode="internal").averages_layers()


# --- E_D -----------------------------------------------------------------------------------------

def test_input_fusion_with_zero_extra_columns_equals_the_single_layer_model():
    single = tiny_llava()
    fused = fuse_at_input(copy.deepcopy(single), resolve_layer_set([0, 1], 2, single.config.vision_feature_layer))
    assert type(fused) is LlavaForConditionalGeneration and fused.config.vision_feature_layer == [0, 1, 2]
    assert fused.model.multi_modal_projector.linear_1.in_features == 3 * 24
    inputs = batch()
    torch.testing.assert_close(logits(fused, inputs), logits(single, inputs), rtol=0, atol=1e-6)
    # The extra layers are read: trained (non-zero) columns change the answer.
    with torch.no_grad():
        fused.model.multi_modal_projector.linear_1.weight[:, :24].normal_()
    assert not torch.allclose(logits(fused, inputs), logits(single, inputs), atol=1e-3)


def test_input_fusion_refuses_averaged_groups():
    with pytest.raises(InputError, match="whole stage"):
        fuse_at_input(tiny_llava(), [[0, 1], 2])


# --- I_D -----------------------------------------------------------------------------------------

def layer_inputs(model, inputs) -> list[torch.Tensor]:
    """Each decoder layer's hidden-state input, captured after every other pre-hook has run."""
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda module, args, kwargs: captured.append(
        (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
        for layer in model.model.language_model.layers]
    try:
        logits(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def test_internal_fusion_adds_at_its_llm_layer_only_at_image_positions():
    loaded = LoadedModel.from_model(tiny_llava(num_layers=4))
    fusion = InternalFusion.for_model(loaded.adapter, resolve_layer_set([1], 2, -1))
    assert fusion.targets == [2]  # vision layer 1 of 2 -> LLM layer round(1 / 2 * 4)
    with torch.no_grad():  # a trained projector: its output is no longer zero
        for parameter in fusion.projectors.parameters():
            parameter.normal_()
    inputs = batch()
    image = loaded.adapter.visual_token_mask(inputs["input_ids"])
    plain = layer_inputs(loaded.model, inputs)
    with internal_fusion(loaded.adapter, fusion):
        fused = layer_inputs(loaded.model, inputs)
        text_only = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        decode_like = layer_inputs(loaded.model, text_only)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=0)
    changed = (fused[2] - plain[2]).abs().amax(-1) > 0
    assert torch.equal(changed, image)
    # A call without image tokens (a decode step) is left alone; after the block, the model is plain again.
    for with_fusion, without in zip(decode_like, layer_inputs(loaded.model, text_only)):
        torch.testing.assert_close(with_fusion, without, rtol=0, atol=0)
    torch.testing.assert_close(layer_inputs(loaded.model, inputs)[2], plain[2], rtol=0, atol=0)


def test_the_schedule_engine_runs_internal_fusion_as_the_model_does():
    """The engine builds input embeddings itself (tokens, then the tower): the tower layers kept for the fusion
    must be this call's when the LLM layers read them."""
    loaded = LoadedModel.from_model(tiny_llava(num_layers=4))
    fusion = InternalFusion.for_model(loaded.adapter, resolve_layer_set([1], 2, -1))
    with torch.no_grad():
        for parameter in fusion.projectors.parameters():
            parameter.normal_()
    inputs = batch()
    engine = ScheduledLLM(loaded.adapter, dense(4))
    with internal_fusion(loaded.adapter, fusion), torch.no_grad():
        expected = logits(loaded.model, inputs)
        hidden = engine.forward(loaded.adapter.input_embeddings(inputs), inputs["input_ids"],
                                inputs["attention_mask"]).hidden
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(loaded.adapter.lm_head(hidden)[real], expected[real], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, logits(loaded.model, inputs))  # the fusion did change the answer


def test_untrained_internal_fusion_adds_nothing():
    loaded = LoadedModel.from_model(tiny_llava(num_layers=4))
    inputs = batch()
    plain = logits(loaded.model, inputs)
    with internal_fusion(loaded.adapter, InternalFusion.for_model(loaded.adapter, [[1, 2], 2])):
        torch.testing.assert_close(logits(loaded.model, inputs), plain, rtol=0, atol=0)


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised])


def test_internal_fusion_trained_from_the_feature_cache_has_the_live_models_loss():
    """Training runs no vision tower: the extra layer's cached outputs are fed to the hooks. That must give the
    loss the live model gives, its hooks reading the tower on the same images."""
    inputs = llava_batch([[5, *image_tokens_llava(), 7, 8, 9], [6, *image_tokens_llava(), 10, 11, 12]], [1, 1])
    labels = inputs["input_ids"].clone()
    labels[:, :6] = IGNORE_INDEX  # the answer: the last three tokens
    cached_model = LoadedModel.from_model(tiny_llava(num_layers=4))
    extension = CachedInternalFusion(cached_model.adapter, [1, 2])
    assert extension.vision_layers == [1] and extension.fusion.targets == [2]
    with torch.no_grad():  # trained projectors: their outputs are no longer zero
        for parameter in extension.parameters():
            parameter.normal_(std=0.5)
    live_model = LoadedModel.from_model(tiny_llava(num_layers=4))
    attach(live_model.adapter, copy.deepcopy(extension.fusion))
    with torch.no_grad():
        live = answer_cross_entropy(live_model.model(**inputs).logits, labels)
        plain = answer_cross_entropy(tiny_llava(num_layers=4)(**inputs).logits, labels)
        features, layers = tower_outputs(cached_model.adapter, inputs["pixel_values"], extension.vision_layers)
        engine = ScheduledLLM(cached_model.adapter, dense(4))
        cached = ScheduledLoss(cached_model.model, engine, features, extension, layers)(
            inputs["input_ids"], labels, torch.arange(2))
    assert not torch.allclose(live, plain)  # the fusion changes the loss, so the equality below says something
    torch.testing.assert_close(cached, live)


def test_internal_fusion_trains_although_the_loaded_model_is_frozen():
    """`load_model` freezes every weight; I_D's projectors, copies of the loaded one, are what training updates."""
    model = tiny_llava(num_layers=4).requires_grad_(False)
    extension = CachedInternalFusion(LoadedModel.from_model(model).adapter, [1, 2])
    assert all(parameter.requires_grad for parameter in extension.parameters())
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_internal_fusion_weights_load_back_only_into_the_same_layers(tmp_path):
    adapter = LoadedModel.from_model(tiny_llava(num_layers=4)).adapter
    trained = InternalFusion.for_model(adapter, [1, 2])
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.normal_()
    save_internal_fusion(trained, tmp_path)
    fresh = InternalFusion.for_model(adapter, [1, 2])
    load_internal_fusion(fresh, tmp_path)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.raises(InputError, match="projectors for other layers"):
        load_internal_fusion(InternalFusion.for_model(adapter, [1, [1, 2], 2]), tmp_path)
    with pytest.raises(InputError, match="without internal_fusion.safetensors"):
        load_internal_fusion(fresh, tmp_path / "elsewhere")


# --- FLOPs, variant, registration -----------------------------------------------------------------

def test_flops_grow_only_by_the_projectors():
    shapes, text = DEFAULT_MODEL_SHAPES, 32
    base = token_schedule_flops(shapes, text, [256] * 30).prefill
    tokens, (d_vision, d_llm), (_, out) = 256, *shapes.projector_linears
    wide = fusion_flops(FusionConfig(layers="stages"), shapes, text).prefill
    assert wide.vision == base.vision and wide.llm_layers == base.llm_layers
    assert wide.projector == 2 * tokens * (3 * d_vision * d_llm + d_llm * out)
    internal = fusion_flops(FusionConfig(layers="stages", mode="internal"), shapes, text).prefill
    assert internal.projector == 3 * base.projector and internal.llm_layers == base.llm_layers


def test_the_bench_variant_answers_as_dense_until_trained():
    inputs = batch()
    dense_model = ScheduledModel(LoadedModel.from_model(tiny_llava()), dense(4), "dense")
    variant = fusion_variant(LoadedModel.from_model(tiny_llava()), FusionConfig(layers=[1]))
    assert isinstance(variant, FusedModel) and variant.groups == [1, 2]
    with torch.no_grad():
        assert torch.equal(variant.prefill(inputs).token, dense_model.prefill(inputs).token)
    shapes = ModelShapes.of_model(dense_model.loaded)  # the bench counts every variant on dense's shapes
    assert variant.flops(shapes, 8).prefill.projector > dense_model.flops(shapes, 8).prefill.projector


def test_fusion_is_registered_and_exports_from_a_vision_layers_run(tmp_path):
    method = registry.method("fusion")
    assert method.run_kinds == ("vision-layers",) and "fusion" in registry.variants()
    store = RunStore.open(tmp_path / "run", kind="vision-layers", model="default", data="probe:4", config={})
    store.write_json("summary", {"recommended_layers": [3, 8], "num_vision_layers": 12})
    store.finish()
    fields = method.from_run(RunStore.load(tmp_path / "run"))
    assert FusionConfig(**fields).layers == [3, 8] and fields["num_vision_layers"] == 12
