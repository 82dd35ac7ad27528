"""Streaming with group position encoding: a batch-trained LLM that reads and writes at once (simultaneous
translation, wait-k). Source and target tokens take position ids in two groups, decoding keeps two KV caches,
and training is one forward pass with the streaming mask. Registers the `streaming` method (`wb train
streaming`, `wb eval streaming`).
"""

from efficient_models.registry import Method, register
from efficient_models.streaming.command import train_command
from efficient_models.streaming.config import StreamingConfig
from efficient_models.streaming.eval_command import eval_command

register(Method(
    name="streaming", summary="simultaneous translation with group position ids and two KV caches",
    config=StreamingConfig, train=train_command, evaluations=(("streaming", eval_command),),
    # A text-only method on any Hugging Face causal LM: it runs on the language model of every architecture.
    runs_on=lambda adapter: True,
))
