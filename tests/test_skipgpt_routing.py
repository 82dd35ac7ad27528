"""SkipGPT's routers and routed model on a tiny random Llama: gates, the sparsity loss's padding mask, real
skipping against gated computation, the KV-cache rule, padded batches."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from efficient_models.skipgpt.cache import SkipCache
from efficient_models.skipgpt.generation import greedy_generate
from efficient_models.skipgpt.loss import mean_run_share, next_token_loss, sparsity_loss
from efficient_models.skipgpt.routed_lm import RoutedLM
from efficient_models.skipgpt.routers import linear_at, run_gate
from tests.tiny_models import PAD_ID, VOCAB, tiny_llava
from workbench.errors import InputError


def tiny_llama(seed: int = 0, num_layers: int = 4, attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD_ID,
                         max_position_embeddings=128, attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


def scrambled(routed: RoutedLM, seed: int = 1) -> RoutedLM:
    """Routers with random weights and no bias: they split tokens about evenly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in routed.routers:
            for router in (layer.attention, layer.mlp):
                router.net[0].weight.copy_(torch.randn(router.net[0].weight.shape, generator=generator))
                router.net[2].weight.copy_(torch.randn(router.net[2].weight.shape, generator=generator))
                router.net[2].bias.zero_()
    return routed


def padded_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 14), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids.masked_fill(mask == 0, PAD_ID), mask


# -- gates ---------------------------------------------------------------------------------------------------

def test_argmax_gates_are_deterministic_and_follow_the_larger_logit():
    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.5], [0.1, 0.0]])
    assert run_gate(logits, None).tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(run_gate(logits, None), run_gate(logits, None))


def test_sampled_gates_are_hard_with_straight_through_gradients():
    torch.manual_seed(0)
    logits = torch.zeros(2000, 2, requires_grad=True)
    gates = run_gate(logits, 5.0)
    assert set(gates.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < gates.mean().item() < 0.6  # equal logits: a fair coin
    gates.sum().backward()
    assert logits.grad.abs().sum() > 0  # the soft sample's gradient passes straight through the hard value
    assert torch.allclose(logits.grad[:, 0], -logits.grad[:, 1])


def test_temperature_shapes_the_gradient_not_the_sample():
    logits = torch.tensor([[1.0, -1.0]] * 500)
    grads, samples = [], []
    for temperature in (5.0, 1.0):
        torch.manual_seed(3)
        leaf = logits.clone().requires_grad_(True)
        gate = run_gate(leaf, temperature)
        gate.sum().backward()
        samples.append(gate.detach())
        grads.append(leaf.grad.abs().mean().item())
    assert torch.equal(samples[0], samples[1])
    assert grads[0] != pytest.approx(grads[1])


def test_temperature_falls_linearly_from_5_to_1():
    assert linear_at(0, 11, 5.0, 1.0) == 5.0
    assert linear_at(10, 11, 5.0, 1.0) == 1.0
    assert linear_at(5, 11, 5.0, 1.0) == pytest.approx(3.0)


def test_without_noise_a_sample_is_the_argmax_with_a_gradient():
    logits = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    gates = run_gate(logits, 2.0, noise=0.0)
    assert torch.equal(gates, run_gate(logits.detach(), None))
    gates.sum().backward()
    assert (logits.grad[:, 0] > 0).all()


def router_stage(noise_end: float, steps: int = 80) -> float:
    """The argmax run share after training fresh routers on the sparsity loss alone (target 0.3 skipped)."""
    model = tiny_llama()
    model.requires_grad_(False)
    routed = RoutedLM(model)
    optimizer = torch.optim.Adam(routed.routers.parameters(), lr=2e-2)
    ids, mask = padded_batch()
    torch.manual_seed(0)
    for step in range(steps):
        output = routed(ids, mask, temperature=linear_at(step, steps, 5.0, 1.0),
                        noise=linear_at(step, steps, 1.0, noise_end))
        loss = sparsity_loss(output.attention_gates + output.mlp_gates, mask, 0.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        output = routed(ids, mask, skip=True)
    return mean_run_share(output.attention_gates + output.mlp_gates, mask).item()


def test_annealing_the_noise_makes_the_argmax_meet_the_budget():
    assert router_stage(noise_end=1.0) > 0.95  # under full noise P(run) = 0.7 everywhere: argmax runs all
    assert 0.6 < router_stage(noise_end=0.0) < 0.8


# -- losses --------------------------------------------------------------------------------------------------

def test_sparsity_loss_counts_real_tokens_of_every_layer_and_module():
    real = torch.tensor([[1, 1, 1, 0]])
    gates = [torch.tensor([[1.0, 1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0, 1.0]])]
    assert mean_run_share(gates, real).item() == pytest.approx(3 / 6)
    assert sparsity_loss(gates, real, 0.25).item() == pytest.approx(20 * abs(0.75 - 0.5))


def test_padded_gates_do_not_change_the_sparsity_loss_or_get_gradients():
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    base = [torch.rand(2, 5, generator=torch.Generator().manual_seed(layer)) for layer in range(3)]
    flipped = [gate.clone() for gate in base]
    for gate in flipped:
        gate[real == 0] = 1 - gate[real == 0]
    assert sparsity_loss(base, real, 0.4).item() == pytest.approx(sparsity_loss(flipped, real, 0.4).item())
    leaves = [gate.clone().requires_grad_(True) for gate in base]
    sparsity_loss(leaves, real, 0.4).backward()
    assert all((leaf.grad[real == 0] == 0).all() and (leaf.grad[real == 1] != 0).all() for leaf in leaves)


def test_next_token_loss_ignores_predictions_into_and_out_of_padding():
    logits = torch.randn(1, 4, 10)
    ids = torch.tensor([[3, 4, 5, 6]])
    real = torch.tensor([[1, 1, 1, 0]])
    expected = torch.nn.functional.cross_entropy(logits[0, :2], ids[0, 1:3])
    assert next_token_loss(logits, ids, real).item() == pytest.approx(expected.item())


# -- the routed model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_routers_that_run_everything_give_the_dense_model(attention):
    model = tiny_llama(attention=attention)
    routed = RoutedLM(model)
    with torch.no_grad():
        for layer in routed.routers:
            for router in (layer.attention, layer.mlp):
                router.net[2].bias.copy_(torch.tensor([100.0, -100.0]))
        ids, _ = padded_batch()
        assert torch.allclose(routed(ids, skip=True).logits, model(ids).logits, atol=1e-5)
        assert torch.allclose(routed(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_real_skipping_equals_gated_computation(attention):
    routed = scrambled(RoutedLM(tiny_llama(attention=attention)))
    ids, mask = padded_batch()
    with torch.no_grad():
        gated, skipped = routed(ids, mask), routed(ids, mask, skip=True)
    shares = [gate[mask.bool()].mean().item() for gate in gated.attention_gates + gated.mlp_gates]
    assert min(shares) < 0.8 and max(shares) > 0.2  # the routing really skips, and really runs
    for a, b in zip(gated.attention_gates + gated.mlp_gates, skipped.attention_gates + skipped.mlp_gates):
        assert torch.equal(a, b)
    real = mask.bool()
    assert torch.allclose(gated.logits[real], skipped.logits[real], atol=1e-5)
    # ... and differs from the dense model
    assert not torch.allclose(skipped.logits[real], routed.model(ids, attention_mask=mask).logits[real], atol=1e-3)


def test_a_module_no_token_runs_is_not_called():
    routed = scrambled(RoutedLM(tiny_llama()))
    layer = routed.model.model.layers[1]
    with torch.no_grad():
        routed.routers[1].attention.net[2].bias.copy_(torch.tensor([-100.0, 100.0]))
        routed.routers[1].mlp.net[2].bias.copy_(torch.tensor([-100.0, 100.0]))
    calls = []
    hooks = [module.register_forward_hook(lambda *_: calls.append(1)) for module in (layer.self_attn, layer.mlp)]
    ids, mask = padded_batch()
    with torch.no_grad():
        output = routed(ids, mask, skip=True)
    assert output.attention_gates[1].sum() == 0 and calls == []
    routed(ids, mask)  # the gated computation runs them for every token
    assert len(calls) == 2
    for hook in hooks:
        hook.remove()


def test_padding_runs_no_module():
    routed = scrambled(RoutedLM(tiny_llama()))
    ids, mask = padded_batch()
    with torch.no_grad():
        output = routed(ids, mask)
    for gate in output.attention_gates + output.mlp_gates:
        assert (gate[mask == 0] == 0).all()


def test_a_padded_batch_equals_its_rows_one_by_one():
    routed = scrambled(RoutedLM(tiny_llama()))
    ids, mask = padded_batch()
    with torch.no_grad():
        batch = routed(ids, mask, skip=True).logits
        generated = greedy_generate(routed, ids, mask, max_new_tokens=5)
        for row in range(len(ids)):
            alone = ids[row, mask[row].bool()][None]
            assert torch.allclose(routed(alone, skip=True).logits[0], batch[row, mask[row].bool()], atol=1e-5)
            assert torch.equal(greedy_generate(routed, alone, max_new_tokens=5)[0], generated[row])


def test_cached_generation_equals_uncached_under_the_skip_rule():
    routed = scrambled(RoutedLM(tiny_llama()), seed=2)
    ids, mask = padded_batch(seed=4)
    cached = greedy_generate(routed, ids, mask, max_new_tokens=8, use_cache=True)
    uncached = greedy_generate(routed, ids, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached.flatten().tolist())) > 2  # not a degenerate repetition


def test_a_token_that_skips_attention_leaves_nothing_in_the_cache():
    routed = scrambled(RoutedLM(tiny_llama()))
    ids, _ = padded_batch()
    cache = SkipCache(routed.num_layers)
    with torch.no_grad():
        prefill = routed(ids[:1, :8], cache=cache, skip=True)
        step = routed(ids[:1, 8:9], cache=cache, skip=True)
        whole = routed(ids[:1, :9], skip=True)
    for layer in range(routed.num_layers):
        ran = int(prefill.attention_gates[layer].sum() + step.attention_gates[layer].sum())
        assert cache.slots(layer) == ran and bool(cache.valid[layer].all())
    assert torch.allclose(step.logits[0, -1], whole.logits[0, -1], atol=1e-5)
    assert any(cache.slots(layer) < 9 for layer in range(routed.num_layers))


def test_sampled_gates_train_the_routers_through_the_gated_model():
    model = tiny_llama()
    model.requires_grad_(False)
    routed = scrambled(RoutedLM(model))
    ids, mask = padded_batch()
    torch.manual_seed(0)
    output = routed(ids, mask, temperature=3.0)
    loss = next_token_loss(output.logits, ids, mask) + sparsity_loss(output.attention_gates + output.mlp_gates,
                                                                     mask, 0.25)
    loss.backward()
    grads = [parameter.grad for parameter in routed.routers.parameters()]
    assert all(grad is not None for grad in grads) and sum(grad.abs().sum() for grad in grads) > 0
    with pytest.raises(ValueError):
        routed(ids, mask, temperature=3.0, skip=True)


def test_the_language_model_inside_a_vision_language_model_is_routed():
    llava = tiny_llava()
    routed = RoutedLM(llava)
    assert routed.num_layers == llava.config.text_config.num_hidden_layers
    ids, mask = padded_batch()
    with torch.no_grad():
        output = routed(ids, mask, skip=True)
    assert output.logits.shape == (*ids.shape, VOCAB)


def test_a_model_without_llama_layers_is_one_line():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(InputError, match="not a Llama-family LM"):
        RoutedLM(gpt2)


def test_fresh_routers_run_everything_so_training_starts_from_dense():
    model = tiny_llama(attention="eager")
    assert model.config._attn_implementation == "eager"
    routed = RoutedLM(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        output = routed(ids, mask, skip=True)
        dense = model(ids, attention_mask=mask).logits
    assert all(bool(gate[mask.bool()].all()) for gate in output.attention_gates + output.mlp_gates)
    # rows without left padding: HF's own forward numbers their positions as ours does
    assert torch.allclose(output.logits[0], dense[0], atol=1e-5)
    assert torch.allclose(output.logits[2, :9], dense[2, :9], atol=1e-5)
    torch.manual_seed(0)
    sampled = routed(ids, mask, temperature=5.0)
    share = mean_run_share(sampled.attention_gates + sampled.mlp_gates, mask).item()
    assert 0.75 < share < 0.97  # P(run) = sigmoid(2) under Gumbel noise


@pytest.mark.parametrize("skip", [False, True])
def test_the_routed_model_runs_under_bf16_autocast_close_to_fp32(skip):
    """The recipe's `precision: auto` is bf16 where the CPU computes it natively: the routed model's own fp32
    attention masks (a padded batch, skipped keys dropped) must work with bf16 queries under autocast."""
    routed = scrambled(RoutedLM(tiny_llama()))
    with torch.no_grad():  # decisive routers: no token sits where bf16 rounding could flip its gate
        for layer in routed.routers:
            for router in (layer.attention, layer.mlp):
                router.net[2].weight.mul_(20)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        exact = routed(ids, mask, skip=skip)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approximate = routed(ids, mask, skip=skip)
    for a, b in zip(exact.attention_gates + exact.mlp_gates, approximate.attention_gates + approximate.mlp_gates):
        assert torch.equal(a[real], b[real])
    difference = (approximate.logits.float() - exact.logits)[real].abs().max()
    assert torch.isfinite(approximate.logits).all() and difference < 0.05 * exact.logits[real].abs().max()
