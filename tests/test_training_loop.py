"""The shared training loop: resume gives the same weights, checkpoints are safetensors, configs must match,
one writer per run folder, and the forward pass in the resolved precision."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from efficient_models.token_schedule.finetune import ScheduledLoss
from efficient_models.token_schedule.engine import ScheduledLLM
from efficient_models.token_schedule.scheduled_model import answer_queries
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.training.loop import MicroBatch, open_run, train
from workbench.training.optimisation import Optimisation
from tests.tiny_models import image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.files import LOCK_FILE
from workbench.models.adapter import adapter_for
from workbench.training.sequences import IGNORE_INDEX

SETTINGS = Optimisation(steps=6, learning_rate=0.05, warmup_steps=1, final_learning_rate_ratio=0.1, weight_decay=0.0,
                        max_grad_norm=1.0, precision="fp32", checkpoint_every=2, seed=3)


class Regression(nn.Module):
    def __init__(self, fail_at_call: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.calls, self.fail_at_call = 0, fail_at_call

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt
        return nn.functional.mse_loss(self.linear(x).squeeze(-1) + 0.1 * torch.randn_like(y), y)


def plan():
    generator = torch.Generator().manual_seed(1)
    return [[MicroBatch({"x": torch.randn(3, 4, generator=generator), "y": torch.randn(3, generator=generator)}, 2)
             for _ in range(2)] for _ in range(SETTINGS.steps)]


def run(module: Regression, folder, saved=None, resume=True, settings=SETTINGS):
    with open_run(folder, saved or {"config.yaml": "a: 1\n"}, resume):
        return train(module, dict(module.named_parameters()), plan(), settings, folder, seed_entropy=(5,))


def test_a_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = Regression()
    result = run(straight, tmp_path / "straight")
    assert result.finished and len(result.losses) == SETTINGS.steps
    interrupted = Regression(fail_at_call=7)  # the 4th step's first micro-batch: steps 1-2 are checkpointed
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, tmp_path / "resumed")
    resumed = Regression()
    result = run(resumed, tmp_path / "resumed")
    assert result.resumed_at == 2
    torch.testing.assert_close(resumed.linear.weight, straight.linear.weight, rtol=0, atol=0)
    files = {path.name for path in (tmp_path / "resumed").rglob("*") if path.is_file()}
    assert "config.yaml" in files and "state.json" in files
    assert all(name.endswith((".safetensors", ".json", ".yaml")) for name in files)


def test_a_run_of_another_config_is_not_resumed(tmp_path):
    run(Regression(), tmp_path)
    with pytest.raises(InputError, match="different config.yaml"):
        run(Regression(), tmp_path, saved={"config.yaml": "a: 2\n"})
    assert run(Regression(), tmp_path, saved={"config.yaml": "a: 2\n"}, resume=False).resumed_at == 0


def test_a_run_folder_has_one_writer_and_the_lock_goes_with_the_run(tmp_path):
    with open_run(tmp_path, {"config.yaml": "a: 1\n"}, resume=True):
        assert (tmp_path / LOCK_FILE).is_file()
        with pytest.raises(InputError, match=f"in use by process {os.getpid()} on .* since .*: wait for it"):
            run(Regression(), tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(KeyboardInterrupt):
        run(Regression(fail_at_call=3), tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()  # released on error too
    assert run(Regression(), tmp_path).resumed_at == 0 and not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "then"}))
    assert run(Regression(), tmp_path).finished
    assert f"locked by process {gone.pid} (since then), which is gone" in capsys.readouterr().err


@pytest.mark.parametrize("requested, native_bf16, autocast",
                         [("auto", True, True), ("auto", False, False), ("bf16", False, True), ("fp32", True, False)])
def test_the_forward_runs_in_the_resolved_precision(tmp_path, monkeypatch, requested, native_bf16, autocast):
    monkeypatch.setattr("workbench.training.precision.computes_bf16_natively", lambda device: native_bf16)
    seen = []

    class Recording(Regression):
        def forward(self, x, y):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x, y)

    run(Recording(), tmp_path, settings=SETTINGS.model_copy(update={"precision": requested}))
    assert seen and set(seen) == {autocast}


def test_answer_queries_mark_the_token_before_each_answer():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]])
    assert answer_queries(labels)[0].nonzero().flatten().tolist() == [1, 5]


def test_scheduled_loss_trains_through_a_pruning_schedule(tmp_path):
    model = tiny_llava(num_layers=4)
    adapter = adapter_for(model)
    rows = [[1, 5] + image_tokens_llava() + [7, 8, 9, 10], [1] + image_tokens_llava() + [7, 9, 10, 11, 12]]
    batch = llava_batch(rows, [1, 1])
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    with torch.no_grad():
        features = model.model.vision_tower(batch["pixel_values"]).last_hidden_state[:, 1:]
    micro = MicroBatch({"input_ids": batch["input_ids"], "labels": labels, "scenes": torch.tensor([0, 1]),
                        "attention_mask": batch["attention_mask"]})
    engine = ScheduledLLM(adapter, TokenSchedule(4, inject_layer=1, exit_layer=3, cuts={2: 0.5}))
    module = ScheduledLoss(model, engine, features)
    model.requires_grad_(False)
    adapter.projector.requires_grad_(True)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    settings = SETTINGS.model_copy(update={"steps": 8, "learning_rate": 0.01})
    with open_run(tmp_path, {}, resume=False):
        losses = train(module, parameters, [[micro]] * 8, settings, tmp_path).losses
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_a_runs_projector_and_lora_are_whole_files_with_the_umasks_mode(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from workbench.training.lora import LoraSettings, add_lora, save_projector_and_lora

    model = tiny_llava(num_layers=1)
    adapter = adapter_for(model)
    peft_model = add_lora(adapter, LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=["q_proj"]), seed=0)
    processor = SimpleNamespace(image_processor=SimpleNamespace(crop_size={"height": 28, "width": 28}))
    previous = os.umask(0o022)
    try:
        save_projector_and_lora(tmp_path, adapter, peft_model, processor)
    finally:
        os.umask(previous)
    written = [tmp_path / "projector.safetensors", *sorted((tmp_path / "lora").iterdir())]
    assert {path.name for path in written} >= {"projector.safetensors", "adapter_model.safetensors",
                                               "adapter_config.json"}
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in written)  # safetensors alone makes them 0600
    with safe_open(tmp_path / "projector.safetensors", framework="pt") as saved:  # what the projector reads
        assert saved.metadata() == {"vision_feature_layer": str(model.config.vision_feature_layer), "image_size": "28"}
    projector = load_file(tmp_path / "projector.safetensors")
    expected = adapter.projector.state_dict()
    assert projector.keys() == {"multi_modal_projector." + name for name in expected}
    assert all(torch.equal(projector["multi_modal_projector." + name], tensor) for name, tensor in expected.items())
    assert not [path for path in tmp_path.iterdir() if path.name.startswith("tmp")]  # the staging folder is gone
