"""SkipGPT: per-token routers that skip attention and MLP modules of a Llama-family causal LM, with real
skipping at inference (only the tokens that run a module are computed) and a KV-cache rule for skipped tokens.
Registers the text-only `skipgpt` method (`wb train skipgpt --stage routers|lora`, `wb eval skipgpt`).

Modules: `routers` (routers, gates, temperature), `loss` (sparsity and next-token losses), `routed_lm` (the
routed decoder loop: gated or real skipping), `cache` (the KV cache and its rule), `generation` (greedy
decoding), `text_data` and `perplexity` (the text and its metric), `training` and `command` (the two stages),
`evaluation` and `eval_command` (perplexity, realised sparsity and wall-clock against dense).
"""

from efficient_models.registry import Method, register
from efficient_models.skipgpt.command import train_command
from efficient_models.skipgpt.config import SkipGPTConfig
from efficient_models.skipgpt.eval_command import eval_command

register(Method(
    name="skipgpt", summary="per-token routers that skip attention and MLP modules, with real skipping",
    config=SkipGPTConfig, train=train_command, evaluations=(("skipgpt", eval_command),),
    # A text-only method on a Llama-family causal LM: the language model of every architecture here is one.
    runs_on=lambda adapter: True,
))
