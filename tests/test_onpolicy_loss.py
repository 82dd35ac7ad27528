"""The on-policy SFT loss (response tokens only, token mean), pass@k against hand-computed values, and the
accuracy-length Pareto frontier."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from efficient_models.onpolicy_sft.loss import IGNORE, response_batch, response_loss_sum, supervised_tokens
from efficient_models.onpolicy_sft.pass_at_k import mean_pass_at_k, pass_at_k

PAD = 0


def _tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


PROMPTS = [[5, 6, 7], [8, 9]]
RESPONSES = [[10, 11], [12, 13, 14, 15]]


def _reference_row_losses(model) -> list[list[float]]:
    """Each row alone, unpadded: -log p(response token | everything before it), per response token."""
    rows = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        ids = torch.tensor([prompt + response])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        rows.append([-log_probs[len(prompt) + offset - 1, token].item() for offset, token in enumerate(response)])
    return rows


def test_batch_labels_only_the_response_tokens():
    batch = response_batch(PROMPTS, RESPONSES, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 11, 0], [8, 9, 12, 13, 14, 15]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert batch["labels"].tolist() == [[IGNORE] * 3 + [10, 11, IGNORE], [IGNORE] * 2 + [12, 13, 14, 15]]
    assert supervised_tokens(batch["labels"]) == 6


def test_token_mean_loss_matches_rows_computed_alone():
    model = _tiny_lm()
    batch = response_batch(PROMPTS, RESPONSES, pad_id=PAD)
    with torch.no_grad():
        loss = response_loss_sum(model, **batch) / supervised_tokens(batch["labels"])
        rows = _reference_row_losses(model)
    token_mean = sum(map(sum, rows)) / sum(map(len, rows))
    assert loss.item() == pytest.approx(token_mean, abs=1e-5)
    # The rows have 2 and 4 response tokens, so a mean of per-row means is a different number.
    row_mean = sum(sum(row) / len(row) for row in rows) / len(rows)
    assert abs(loss.item() - row_mean) > 1e-3


def test_prompt_and_padding_tokens_carry_no_gradient():
    model = _tiny_lm()
    batch = response_batch(PROMPTS, RESPONSES, pad_id=PAD)
    embeddings = model.get_input_embeddings()
    inputs = embeddings(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    loss.backward()
    per_position = inputs.grad.abs().sum(-1)
    # Row 0's pad (position 5) comes after everything learned: it cannot affect the loss.
    assert per_position[0, 5] == 0
    # The last response token is only a target, never an input to a learned prediction.
    assert per_position[0, 4] == 0 and per_position[1, 5] == 0
    with torch.no_grad():
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][0, 5] = 33  # a different pad token
        assert response_loss_sum(model, **changed).item() == pytest.approx(response_loss_sum(model, **batch).item())


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="empty response"):
        response_batch([[1]], [[]], pad_id=PAD)
    with pytest.raises(ValueError, match="one response per prompt"):
        response_batch([[1], [2]], [[3]], pad_id=PAD)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0), (5, 5, 3, 1.0), (5, 2, 1, 2 / 5),
    (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
    (10, 3, 4, 1 - 35 / 210),  # C(7,4)=35, C(10,4)=210
    (4, 1, 4, 1.0),  # n - c < k: every draw of k holds the correct one
    (200, 1, 100, 0.5),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_mean_pass_at_k_and_bad_arguments():
    assert mean_pass_at_k([0, 2, 5], n=5, k=2) == pytest.approx((0 + 0.7 + 1) / 3)
    assert math.isclose(mean_pass_at_k([1], n=1, k=1), 1.0)
    for n, c, k in [(5, 6, 1), (5, 1, 0), (5, 1, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pareto_frontier_keeps_the_undominated_models():
    from efficient_models.onpolicy_sft.pareto import pareto_frontier

    # (mean tokens, pass@1): 1 is shorter and as accurate as 0; 3 is longer and less accurate than 2.
    points = [(300, 0.60), (200, 0.60), (100, 0.40), (150, 0.35), (400, 0.70), (200, 0.60)]
    assert pareto_frontier(points) == [2, 1, 5, 4]  # ties are both kept; shortest first
