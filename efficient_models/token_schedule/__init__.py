"""The token-schedule engine: which visual tokens each decoder layer sees, run for real.

Shared by HiDrop, FastV, PyramidDrop, late injection, EmbedLens category pruning and the interventions
analysis: `schedule` says which tokens each layer sees, `engine` runs the LLM that way, `scoring`
ranks visual tokens without attention maps, `scheduled_model` makes a schedule a bench variant. Registers the
`dense` variant, the reference of every bench ratio.
"""

from efficient_models.registry import Variant, register_variant
from efficient_models.token_schedule.schedule import dense


def _dense(request):
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    return ScheduledModel(request.loaded, dense(request.loaded.adapter.num_llm_layers), "dense")


register_variant(Variant("dense", "every visual token in every layer: the reference of every ratio", _dense))
