"""`wb train streaming` on a tiny random Llama and a tiny BPE tokenizer: it learns, saves, resumes, refuses."""

import json

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from efficient_models.streaming.training import DEFAULT_RECIPE
from tests.test_streaming_chat_format import tiny_tokenizer


@pytest.fixture
def tiny_language_model(monkeypatch):
    tokenizer = tiny_tokenizer()
    asked = []

    def load(name):
        """A fresh model per call, as loading one from disk gives."""
        asked.append(name)
        torch.manual_seed(0)
        # A wide initialisation: with the default 0.02 the frozen lm_head keeps every distribution near uniform.
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             initializer_range=0.2))
        return model.eval(), tokenizer

    monkeypatch.setattr("workbench.models.causal_lm.load_causal_lm", load)
    return asked


def small_recipe(tmp_path, steps=8):
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe.update(train_pairs=16, pairs_per_step=4, micro_batch_size=2)
    recipe["optimisation"].update(steps=steps, warmup_steps=1, learning_rate=3e-2, checkpoint_every=4)
    recipe["lora"].update(rank=4, alpha=8)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_learns_saves_the_adapter_and_resumes(tmp_path, run_wb, tiny_language_model):
    out = tmp_path / "run"
    code, stdout, _ = run_wb("train", "streaming", "--wait-k", "2", "--recipe", str(small_recipe(tmp_path)),
                             "--out", str(out))
    assert code == 0, stdout
    assert tiny_language_model == ["default"]  # the config's model
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["wait_k"] == 2
    train = json.loads((out / "metrics.json").read_text())["train"]
    assert train["steps"] == 8 and train["loss_last_tenth"] < train["loss_first_tenth"] - 1.0
    assert "streaming wait-2 LoRA on default: 8 steps" in stdout

    code, again, _ = run_wb("train", "streaming", "--wait-k", "2", "--recipe", str(small_recipe(tmp_path)),
                            "--out", str(out))
    assert code == 0 and "8 steps" in again  # a finished run is restored, not trained again


def test_bad_options_are_one_line(tmp_path, run_wb, tiny_language_model):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train_pairs: 3\n")
    code, stdout, stderr = run_wb("train", "streaming", "--recipe", str(recipe), "--out", str(tmp_path / "run"))
    assert code != 0 and "invalid recipe" in stdout + stderr and "Traceback" not in stdout + stderr
    config = tmp_path / "config.yaml"
    config.write_text("method: streaming\nwait_k: 0\n")
    code, stdout, stderr = run_wb("train", "streaming", "--config", str(config), "--out", str(tmp_path / "run"))
    assert code != 0 and "wait_k" in stdout + stderr
    code, stdout, stderr = run_wb("train", "streaming", "--layout", "diagonal", "--out", str(tmp_path / "run"))
    assert code != 0 and "training_layout" in stdout + stderr and "Traceback" not in stdout + stderr


def test_the_interleaved_layout_trains_and_is_recorded(tmp_path, run_wb, tiny_language_model):
    out = tmp_path / "run"
    code, stdout, _ = run_wb("train", "streaming", "--layout", "interleaved", "--wait-k", "2",
                             "--recipe", str(small_recipe(tmp_path)), "--out", str(out))
    assert code == 0, stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["training_layout"] == "interleaved"
    train = json.loads((out / "metrics.json").read_text())["train"]
    assert train["loss_last_tenth"] < train["loss_first_tenth"] - 1.0
    assert "interleaved wait-2 LoRA" in stdout


def test_a_mixed_policy_run_trains_each_pair_at_its_drawn_k(tmp_path, run_wb, tiny_language_model):
    out = tmp_path / "run"
    code, stdout, _ = run_wb("train", "streaming", "--mixed-wait-k", "1,3,offline",
                             "--recipe", str(small_recipe(tmp_path)), "--out", str(out))
    assert code == 0, stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["training_wait_ks"] == [1, 3, "offline"]
    assert "streaming wait-1/3/offline LoRA" in stdout
    code, stdout, stderr = run_wb("train", "streaming", "--mixed-wait-k", "1,full", "--out", str(tmp_path / "bad"))
    assert code != 0 and "--mixed-wait-k" in stdout + stderr and "Traceback" not in stdout + stderr


def test_mixed_policies_are_drawn_per_pair_by_seed_and_offline_sees_the_whole_source():
    from efficient_models.streaming.batch import streaming_example
    from efficient_models.streaming.chat_format import ChatFormat
    from efficient_models.streaming.config import StreamingConfig
    from efficient_models.streaming.task import make_splits
    from efficient_models.streaming.training import encode_pairs, training_wait_ks

    config = StreamingConfig(training_wait_ks=[1, "offline"])
    drawn = training_wait_ks(config, 40, seed=5)
    assert drawn == training_wait_ks(config, 40, seed=5) != training_wait_ks(config, 40, seed=6)
    assert set(drawn) == {1, 10**9}
    assert training_wait_ks(StreamingConfig(wait_k=4), 3, seed=5) == [4, 4, 4]

    tokenizer = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tokenizer, config.instruction)
    pairs = make_splits(0, 12)[0]
    examples = encode_pairs(pairs, tokenizer, chat, config, seed=5)
    for pair, wait_k, example in zip(pairs, training_wait_ks(config, len(pairs), seed=5), examples, strict=True):
        source = chat.source_group(tokenizer, pair.source_words)
        target, words = chat.target(tokenizer, pair.target)
        assert torch.equal(example.allowed, streaming_example(source, target, words, wait_k).allowed)
        if wait_k != 1:  # offline: every target token sees every source token
            assert example.allowed[len(source.ids):, :len(source.ids)].all()


def test_the_streaming_loss_runs_under_bf16_autocast_close_to_fp32():
    """The recipe's `precision: auto` is bf16 here: the fp32 streaming mask (blocked = fp32 minimum) must neither
    overflow to NaN nor be ignored under bf16 autocast."""
    from efficient_models.streaming.batch import collate, streaming_example
    from efficient_models.streaming.groups import SourceGroup
    from efficient_models.streaming.training import StreamingLoss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, attn_implementation="sdpa"))
    source = SourceGroup.build([3, 4], [[5, 6], [7], [8, 9]], [2])
    example = streaming_example(source, [10, 11, 12, 13, 1], [0, 0, 1, 2, 3], wait_k=1)
    batch = collate([example], torch.float32, pad_id=0)
    loss = StreamingLoss(model)
    exact = loss(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approximate = loss(**batch)
    assert torch.isfinite(approximate) and abs(approximate.item() - exact.item()) < 0.05 * exact.item()
