"""`wb train skipgpt` and `wb eval skipgpt` on a tiny random Llama folder with a BPE tokenizer learnt on the
text: both stages train what they should and nothing else, save, resume, refuse bad input; the eval table."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from efficient_models.skipgpt.training import DEFAULT_RECIPE, StepPlan, load_recipe
from efficient_models.skipgpt.config import SkipGPTConfig


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama and a 300-token byte-level BPE (learnt on the text's first topics), saved as a model folder."""
    from pydoc_data.topics import topics

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([topics[name] for name in sorted(topics)[:10]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                         initializer_range=0.2))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_recipe(tmp_path, routers_steps=4, lora_steps=2):
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe.update(block_size=32, blocks_per_step=4, micro_batch_size=2, train_blocks=16)
    recipe["routers"]["optimisation"].update(steps=routers_steps, warmup_steps=1, checkpoint_every=2)
    recipe["lora"]["optimisation"].update(steps=lora_steps, warmup_steps=1, learning_rate=1e-2, checkpoint_every=2)
    recipe["lora"]["adapter"].update(rank=4, alpha=8)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_plan_carries_a_falling_temperature_and_noise_in_the_router_stage_only():
    recipe = load_recipe(DEFAULT_RECIPE)
    blocks = torch.arange(40 * 8).view(40, 8)
    plan = StepPlan(blocks, recipe, recipe.routers.optimisation, SkipGPTConfig())
    temperatures = [plan[step][0].tensors["temperature"].item() for step in range(len(plan))]
    assert temperatures[0] == 5.0 and temperatures[-1] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(temperatures, temperatures[1:]))
    noise = [plan[step][0].tensors["noise"].item() for step in range(len(plan))]
    assert noise[0] == 1.0 and noise[-1] == 0.0
    assert len(plan[0]) == recipe.blocks_per_step // recipe.micro_batch_size
    assert "temperature" not in StepPlan(blocks, recipe, recipe.lora.optimisation, None)[0][0].tensors


def test_both_stages_train_save_resume_and_evaluate(tmp_path, run_wb, tiny_folder):
    recipe = str(small_recipe(tmp_path))
    routers_run, lora_run = tmp_path / "routers", tmp_path / "lora"
    code, stdout, stderr = run_wb("train", "skipgpt", "--stage", "routers", "--sparsity", "0.4", "--model",
                                  str(tiny_folder), "--recipe", recipe, "--out", str(routers_run))
    assert code == 0, stdout + stderr
    assert "4 steps" in " ".join(stdout.split())
    config = yaml.safe_load((routers_run / "config.yaml").read_text())
    assert config["sparsity"] == 0.4 and config["method"] == "skipgpt"
    routers = load_file(routers_run / "routers.safetensors")
    assert len(routers) == 2 * 2 * 4  # 2 layers x 2 routers x (2 linear layers x weight, bias)
    assert routers["0.attention.net.2.bias"].tolist() != [1.0, -1.0]  # trained from its initial bias
    metrics = json.loads((routers_run / "metrics.json").read_text())
    assert metrics["stage"] == "routers" and metrics["train"]["steps"] == 4

    code, again, _ = run_wb("train", "skipgpt", "--stage", "routers", "--sparsity", "0.4", "--model",
                            str(tiny_folder), "--recipe", recipe, "--out", str(routers_run))
    assert code == 0 and "4 steps" in " ".join(again.split())  # a finished run is restored, not trained again
    code, stdout, stderr = run_wb("train", "skipgpt", "--stage", "routers", "--sparsity", "0.3", "--model",
                                  str(tiny_folder), "--recipe", recipe, "--out", str(routers_run))
    assert code != 0 and "different config.yaml" in stdout + stderr

    code, stdout, stderr = run_wb("train", "skipgpt", "--stage", "lora", "--routers", str(routers_run),
                                  "--recipe", recipe, "--out", str(lora_run))
    assert code == 0, stdout + stderr
    assert (lora_run / "lora" / "adapter_model.safetensors").is_file()
    lora_routers = load_file(lora_run / "routers.safetensors")
    assert all(torch.equal(lora_routers[name], routers[name]) for name in routers)  # frozen
    assert yaml.safe_load((lora_run / "config.yaml").read_text())["sparsity"] == 0.4
    adapter = load_file(lora_run / "lora" / "adapter_model.safetensors")
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter}
    assert targets == {"q_proj", "v_proj", "gate_proj"}

    out = tmp_path / "eval"
    code, stdout, stderr = run_wb("eval", "skipgpt", "--run", str(lora_run), "--blocks", "6", "--batch-size", "3", "--timing-blocks", "2",
                                  "--repeats", "1", "--out", str(out))
    assert code == 0, stdout + stderr
    results = json.loads((out / "results.json").read_text())
    dense, gated, skipping = results["rows"]
    assert dense["model"] == "dense" and dense["speedup"] == 1.0 and results["blocks"] == 6
    assert gated["perplexity"] == skipping["perplexity"] and skipping["perplexity"] != dense["perplexity"]
    assert 0 <= skipping["attention_skipped"] <= 1 and 0 <= skipping["mlp_skipped"] <= 1
    both = (skipping["attention_skipped"] + skipping["mlp_skipped"]) / 2
    assert skipping["modules_skipped"] == pytest.approx(both)
    assert 1 < dense["perplexity"] < 1e4
    routing = results["routing"]
    assert len(routing["attention_skipped_by_layer"]) == 2 and len(routing["mlp_skipped_by_position"]) == 4
    # the per-layer shares average to the overall share
    assert sum(routing["attention_skipped_by_layer"]) / 2 == pytest.approx(skipping["attention_skipped"], abs=1e-3)
    assert "| dense |" in (out / "table.md").read_text()


def test_bad_options_are_one_line(tmp_path, run_wb, tiny_folder):
    out = str(tmp_path / "run")
    for args, message in [
        (("--stage", "everything"), "choose routers or lora"),
        (("--stage", "lora"), "needs --routers"),
        (("--stage", "lora", "--routers", str(tmp_path), "--sparsity", "0.3"), "belong to --stage routers"),
        (("--stage", "lora", "--routers", str(tmp_path)), "not a training run"),
        (("--stage", "routers", "--routers", str(tmp_path)), "--routers belongs to --stage lora"),
        (("--stage", "routers", "--sparsity", "1.5"), "0.99"),
    ]:
        code, stdout, stderr = run_wb("train", "skipgpt", *args, "--model", str(tiny_folder), "--out", out)
        assert code != 0 and message in stdout + stderr and "Traceback" not in stdout + stderr, args
    code, stdout, stderr = run_wb("eval", "skipgpt", "--run", str(tmp_path), "--out", str(tmp_path / "eval"))
    assert code != 0 and "not a training run" in stdout + stderr


def test_eval_with_baselines_measures_them_at_the_runs_budget(tmp_path, run_wb, tiny_folder):
    recipe = str(small_recipe(tmp_path))
    routers_run, out = tmp_path / "routers", tmp_path / "eval"
    code, stdout, stderr = run_wb("train", "skipgpt", "--stage", "routers", "--sparsity", "0.5", "--model",
                                  str(tiny_folder), "--recipe", recipe, "--out", str(routers_run))
    assert code == 0, stdout + stderr
    code, stdout, stderr = run_wb("eval", "skipgpt", "--run", str(routers_run), "--blocks", "6", "--batch-size", "3",
                                  "--timing-blocks", "1", "--repeats", "1", "--baselines", "--out", str(out))
    assert code == 0, stdout + stderr
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    skipping = results["rows"][2]
    pruning = rows["static-pruning"]
    # As many modules removed as the run skips on average (4 modules: the nearest quarter).
    assert pruning["modules_skipped"] == pytest.approx(round(skipping["modules_skipped"] * 4) / 4)
    assert pruning["attention_skipped"] + pruning["mlp_skipped"] == pytest.approx(2 * pruning["modules_skipped"])
    top_k = rows["mixture-of-depths-topk"]
    assert top_k["modules_skipped"] == pytest.approx(0.5, abs=0.05)  # capacity 1 - 0.5 of every row's tokens
    assert "mixture-of-depths-predictor" in rows and 0 <= results["mixture_of_depths_predictor_agreement"] <= 1
    assert (out / "mixture-of-depths" / "mixture_of_depths.json").is_file()  # its own resumable run folder
