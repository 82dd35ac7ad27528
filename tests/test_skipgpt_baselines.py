"""SkipGPT's baselines on tiny random Llama models: static module pruning and Mixture-of-Depths routing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from efficient_models.skipgpt.baseline_measure import mixture_of_depths_row, static_pruning_row
from efficient_models.skipgpt.baseline_mod_training import predictor_agreement, train_mixture_of_depths
from efficient_models.skipgpt.baseline_routing import capacity_selection
from efficient_models.skipgpt.mixture_of_depths import MixtureOfDepths
from efficient_models.skipgpt.static_pruning import (
    ModuleRef,
    lowest_influence,
    module_influence,
    prune_modules,
    removed_modules,
)
from workbench.errors import InputError

VOCAB, PAD = 64, 0


def tiny_llama(seed: int = 0, layers: int = 4, attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


def blocks(count: int = 6, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


# No token repeats within a row: tokens that ran no layer yet would tie exactly in router score.
ROWS = [[5, 9, 3, 17, 22, 8, 41, 2, 30], [7, 11, 4, 60], [13, 2, 19, 50, 33, 21]]


# --- static module pruning ------------------------------------------------------------------------

def test_an_identity_module_has_the_lowest_influence_and_is_pruned_first():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()  # the attention adds nothing: an identity module
        model.model.layers[1].mlp.down_proj.weight.mul_(0.01)  # the MLP adds almost nothing
    influence = module_influence(model, blocks(), batch_size=4)
    assert influence.attention[2] == pytest.approx(0, abs=1e-6)
    assert min(influence.attention + influence.mlp) == influence.attention[2]
    assert all(value > 1e-4 for layer, value in enumerate(influence.attention) if layer != 2)
    assert lowest_influence(influence, 1 / 8) == [ModuleRef(2, "attention")]
    assert lowest_influence(influence, 2 / 8) == [ModuleRef(2, "attention"), ModuleRef(1, "mlp")]
    with prune_modules(model, influence, 0.25) as removed:
        assert removed == [ModuleRef(2, "attention"), ModuleRef(1, "mlp")]


def test_removed_modules_do_not_run_and_equal_zeroed_outputs():
    model = tiny_llama()
    removed = [ModuleRef(0, "attention"), ModuleRef(3, "mlp"), ModuleRef(1, "mlp"), ModuleRef(3, "attention")]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for module in removed:
            layer = zeroed.model.layers[module.layer]
            (layer.self_attn.o_proj if module.kind == "attention" else layer.mlp.down_proj).weight.zero_()
    ids, mask = left_padded(ROWS)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append("attention 0"))
    model.model.layers[3].mlp.up_proj.register_forward_hook(lambda *args: calls.append("mlp 3"))
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        calls.clear()
        with removed_modules(model, removed):
            pruned = model(input_ids=ids, attention_mask=mask).logits
        assert calls == []  # really removed: the modules did not run
        expected = zeroed(input_ids=ids, attention_mask=mask).logits
        restored = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(pruned[real], expected[real], rtol=1e-5, atol=1e-5)
    assert (pruned[real] - dense[real]).abs().max() > 1e-2
    torch.testing.assert_close(restored, dense)


def test_pruned_generation_with_cache_equals_without():
    model = tiny_llama(seed=3)
    ids, mask = left_padded(ROWS)
    # Layer 0's attention is the one whose cache length gives positions and mask sizes.
    removed = [ModuleRef(0, "attention"), ModuleRef(2, "attention"), ModuleRef(1, "mlp")]
    with removed_modules(model, removed), torch.no_grad():
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, output_scores=True,
                        return_dict_in_generate=True)
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **settings)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-4)


def test_static_pruning_refuses_bad_input():
    model = tiny_llama()
    influence = module_influence(model, blocks(2), batch_size=2)
    for fraction in (1.0, -0.1, 1.5):
        with pytest.raises(InputError, match="fraction"):
            lowest_influence(influence, fraction)
    with pytest.raises(InputError, match="no module"):
        with removed_modules(model, [ModuleRef(4, "mlp")]):
            pass
    with pytest.raises(InputError, match="calibration"):
        module_influence(model, torch.zeros(0, 8, dtype=torch.long))


# --- Mixture-of-Depths ------------------------------------------------------------------------------

def test_capacity_selection_picks_the_best_ceil_share_of_real_tokens():
    scores = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    _, mask = left_padded(ROWS)
    real = mask.bool()
    for capacity in (0.3, 0.5, 0.75, 1.0):
        chosen = capacity_selection(scores, real, capacity)
        assert not chosen[~real].any()
        for row in range(3):
            assert int(chosen[row].sum()) == math.ceil(capacity * int(real[row].sum()) - 1e-9)
            rejected = real[row] & ~chosen[row]
            if rejected.any():
                assert scores[row][chosen[row]].min() > scores[row][rejected].max()
    ten = torch.ones(1, 10, dtype=torch.bool)
    assert int(capacity_selection(torch.randn(1, 10), ten, 0.7).sum()) == 7  # 0.7 x 10 is 7.000000000000001 in floats


def masked_dense_reference(depth: MixtureOfDepths, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Top-k routing computed densely: every token runs every layer, keys of unchosen tokens are masked out,
    and only chosen tokens keep their update."""
    decoder = depth.model.model
    real = mask.bool()
    hidden = decoder.embed_tokens(ids)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    rotary = decoder.rotary_emb(hidden, position_ids=positions)
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for router, layer in zip(depth.routers, decoder.layers):
        chosen = capacity_selection(router(hidden).squeeze(-1), real, depth.capacity)
        allowed = (causal & chosen[:, None, :]) | torch.eye(length, dtype=torch.bool)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        output = layer(hidden, attention_mask=bias, position_embeddings=rotary)
        hidden = hidden + chosen[..., None] * (output - hidden)
    return depth.model.lm_head(decoder.norm(hidden))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gathered_topk_equals_masked_dense_computation(attention):
    depth = MixtureOfDepths(tiny_llama(attention=attention), capacity=0.5)
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        output = depth(ids, mask, routing="topk")
        expected = masked_dense_reference(depth, ids, mask)
    real = mask.bool()
    counts = output.ran.sum(2)  # (layers, rows)
    assert torch.equal(counts, torch.tensor([math.ceil(0.5 * n) for n in real.sum(1)]).expand_as(counts))
    assert not output.ran[:, ~real].any()
    torch.testing.assert_close(output.logits[real], expected[real], rtol=1e-5, atol=1e-5)


def test_full_capacity_is_the_dense_model():
    model = tiny_llama()
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        routed = MixtureOfDepths(model, capacity=1.0)(ids, mask).logits
        dense = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(routed[mask.bool()], dense[mask.bool()], rtol=1e-5, atol=1e-5)


def mixed_predictor_depth(seed: int = 0) -> MixtureOfDepths:
    """A model whose predictors run some tokens and skip others in every layer."""
    depth = MixtureOfDepths(tiny_llama(seed=seed), capacity=0.5)
    torch.manual_seed(seed)
    with torch.no_grad():
        for predictor in depth.predictors:
            # Random ReLU features read with alternating signs: a logit centred on 0 whatever the hidden scale.
            predictor[0].weight.normal_(0, 1.0)
            predictor[0].bias.zero_()
            predictor[2].weight.copy_(torch.tensor([1.0, -1.0]).repeat(predictor[2].weight.shape[1] // 2)[None])
            predictor[2].bias.zero_()
    return depth


@pytest.mark.parametrize("rows", [ROWS[:2], ROWS[:1]])
def test_predictor_routing_with_cache_equals_without(rows):
    depth = mixed_predictor_depth()
    ids, mask = left_padded(rows)
    with torch.no_grad():
        full = depth(ids, mask, routing="predictor")
        cache = depth.empty_cache()
        steps = [depth(ids[:, :5], mask[:, :5], routing="predictor", cache=cache)]
        steps.append(depth(ids[:, 5:7], mask[:, 5:7], routing="predictor", cache=cache))  # a chunk of two
        steps += [depth(ids[:, t:t + 1], mask[:, t:t + 1], routing="predictor", cache=cache)
                  for t in range(7, ids.shape[1])]
    real = mask.bool()
    assert full.ran[:, real].any() and not full.ran[:, real].all()  # some tokens skip, some run
    torch.testing.assert_close(torch.cat([step.logits for step in steps], 1)[real], full.logits[real],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([step.ran for step in steps], 2), full.ran)
    # The KV rule: each layer's cache holds a valid slot exactly for the tokens that ran it; a row alone
    # holds no other slot (a batch fills masked slots where another row's token ran).
    for layer in range(4):
        assert int(cache.valid[layer].sum()) == int(full.ran[layer].sum())
        if len(rows) == 1:
            assert cache.slots(layer) == int(full.ran[layer].sum())
    if len(rows) == 1:
        assert any(not step.ran[layer].any() for step in steps[2:] for layer in range(4))  # a layer skipped outright


@pytest.mark.parametrize("routing", ["topk", "predictor"])
def test_a_padded_batch_equals_one_row_at_a_time(routing):
    depth = mixed_predictor_depth(seed=2)
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        batch = depth(ids, mask, routing=routing)
        for row, tokens in enumerate(ROWS):
            alone = depth(torch.tensor([tokens]), routing=routing)
            width = len(tokens)
            torch.testing.assert_close(batch.logits[row, -width:], alone.logits[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(batch.ran[:, row, -width:], alone.ran[:, 0])


def test_mixture_of_depths_refuses_bad_input():
    model = tiny_llama()
    for capacity in (0.0, 1.5, -0.5):
        with pytest.raises(InputError, match="capacity"):
            MixtureOfDepths(model, capacity)
    depth = MixtureOfDepths(model, 0.5)
    with pytest.raises(InputError, match="predictor"):
        depth(blocks(1), routing="topk", cache=depth.empty_cache())
    with pytest.raises(InputError, match="routing"):
        depth(blocks(1), routing="sideways")


def test_training_teaches_the_predictor_and_leaves_the_model_frozen(tmp_path):
    depth = MixtureOfDepths(tiny_llama(seed=4), capacity=0.5)
    weights = {name: value.clone() for name, value in depth.model.state_dict().items()}
    router = depth.routers[1].weight.clone()
    train, test = blocks(24, 16, seed=5), blocks(8, 16, seed=6)
    before = predictor_agreement(depth, test)
    record = train_mixture_of_depths(depth, train, tmp_path / "run", steps=30, batch_size=8, learning_rate=1e-2)
    after = predictor_agreement(depth, test)
    assert record.finished and len(record.losses) == 30
    assert after > max(before, 0.6)
    assert not torch.equal(depth.routers[1].weight, router)  # the router weight passes a gradient to the router
    assert all(torch.equal(value, weights[name]) for name, value in depth.model.state_dict().items())
    # A finished run restores its routers instead of training again.
    again = MixtureOfDepths(depth.model, capacity=0.5)
    train_mixture_of_depths(again, train, tmp_path / "run", steps=30, batch_size=8, learning_rate=1e-2)
    assert torch.equal(again.routers[1].weight, depth.routers[1].weight)


# --- measurement rows ------------------------------------------------------------------------------

def test_rows_report_the_skip_share_and_the_perplexity_of_the_routed_model():
    model = tiny_llama()
    test = blocks(4, 10, seed=7)
    influence = module_influence(model, blocks(4, 10), batch_size=4)
    row = static_pruning_row(model, influence, test, 0.25, batch_size=4, repeats=1)
    assert row.name == "static-pruning" and row.fraction_skipped == 0.25
    assert row.seconds > 0 and row.dense_seconds > 0
    with prune_modules(model, influence, 0.25), torch.no_grad():
        logits = model(input_ids=test).logits[:, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), test[:, 1:].reshape(-1)))
    assert row.perplexity == pytest.approx(expected, rel=1e-5)
    depth = MixtureOfDepths(model, capacity=0.3)
    topk = mixture_of_depths_row(depth, test, routing="topk", batch_size=4, repeats=1)
    assert topk.fraction_skipped == pytest.approx(1 - 3 / 10)  # ceil(0.3 x 10) of 10 tokens run each layer
    assert topk.name == "mixture-of-depths-topk" and math.isfinite(topk.perplexity)
    with pytest.raises(InputError, match="test blocks"):
        mixture_of_depths_row(depth, test[:0], routing="topk")
    with pytest.raises(InputError, match="repeats"):
        static_pruning_row(model, influence, test, 0.25, repeats=0)
