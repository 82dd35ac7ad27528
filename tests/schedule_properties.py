"""The properties every token schedule must keep on every architecture, as assertions the engine's tests share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule.engine import ScheduledLLM
from workbench.models.adapter import adapter_for


def assert_dense_reproduces_the_model(model, batch: Mapping[str, torch.Tensor], positions=None) -> None:
    """The dense schedule gives the HF model's logits on real tokens and its greedy `generate`."""
    adapter = adapter_for(model)
    engine = ScheduledLLM(adapter, schedules.dense(adapter.num_llm_layers))
    with torch.no_grad():
        output = engine.forward(adapter.input_embeddings(batch), batch["input_ids"], batch["attention_mask"],
                                positions=positions)
        expected = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(adapter.lm_head(output.hidden)[real], expected[real], atol=1e-5, rtol=1e-4)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(engine.generate(batch, 5), generated)


def assert_padded_batch_equals_one_by_one(engine: ScheduledLLM, batch, single_rows: Iterable[Mapping]) -> None:
    """Each row of the left-padded batch generates what it generates alone, without padding."""
    together = engine.generate(batch, 6)
    for row, single in enumerate(single_rows):
        alone = engine.generate(single, 6)
        assert torch.equal(together[row, :alone.shape[1]], alone[0])
