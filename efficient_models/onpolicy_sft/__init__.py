"""On-policy SFT for shorter reasoning: fine-tune on the model's own samples that are correct and finish
within a length budget (no reference model, KL, critic or advantage). Registers three text-only methods:
`reasoner` (`wb train reasoner`, SFT on verbose solutions: the starting point), `onpolicy-sft`
(`wb train onpolicy-sft`) and its RL baseline `grpo-length` (`wb train grpo-length`, TRL's GRPO).
`wb eval reasoning` (registered with `onpolicy-sft`) scores any of their runs on the test split.

Modules: `task` (problems and worked solutions), `grader` (last boxed answer), `filtering`, `loss`,
`pass_at_k`, `sampling`, `reasoner`, `onpolicy` and `grpo` (the trainings), `evaluation` and `pareto` (the
test-split metrics and the accuracy-length plot), `models` (loading).
"""

from efficient_models.onpolicy_sft.commands import (
    eval_reasoning_command,
    train_grpo_command,
    train_onpolicy_command,
    train_reasoner_command,
)
from efficient_models.onpolicy_sft.config import GRPOLengthConfig, OnPolicySFTConfig, ReasonerConfig
from efficient_models.registry import Method, register

register(Method(name="reasoner", summary="SFT on verbose step-by-step solutions, the start of on-policy SFT",
                config=ReasonerConfig, train=train_reasoner_command))
register(Method(name="onpolicy-sft", summary="fine-tune on own correct samples that finish within a length budget",
                config=OnPolicySFTConfig, train=train_onpolicy_command,
                evaluations=(("reasoning", eval_reasoning_command),)))
register(Method(name="grpo-length", summary="the RL baseline: GRPO with a length-penalised reward (TRL)",
                config=GRPOLengthConfig, train=train_grpo_command))
