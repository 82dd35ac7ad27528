"""Late injection (EmbedLens): visual tokens enter the LLM at one layer; the layers before see text only.

Registers the `injection` method: its config (from an alignment or similarity run), its token schedule
as the `injection` bench variant, and its FLOPs count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from efficient_models.registry import Method, Variant, register
from workbench.configs import LayeredConfig
from workbench.errors import InputError


class InjectionConfig(LayeredConfig):
    method: Literal["injection"] = "injection"
    inject_layer: int

    @model_validator(mode="after")
    def _layers(self):
        self.check_layer(self.inject_layer, "inject_layer")
        return self


def injection_schedule(config: InjectionConfig):
    from efficient_models.token_schedule.schedule import TokenSchedule

    return TokenSchedule(config.num_llm_layers, inject_layer=config.inject_layer, name="injection")


def _flops(config, shapes, text_tokens, answer_tokens=1, decode_steps=1):
    from workbench.flops import token_schedule_flops

    counts = injection_schedule(config).keep_counts(shapes.visual_tokens_per_image)
    return token_schedule_flops(shapes, text_tokens, counts, answer_tokens, decode_steps)


def _from_run(store) -> dict:
    kind = store.manifest["kind"]
    if kind not in ("alignment", "similarity"):
        raise InputError(f"--method injection needs an alignment or similarity run; {store.folder} is a {kind!r} run")
    summary = store.read_json("summary")
    layer = summary["recommended_injection_layer"] if kind == "alignment" else summary["recommendation"]["injection_layer"]
    return {"inject_layer": layer}


def _variant(request):
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    config = request.config("injection")
    if config.num_llm_layers != request.loaded.adapter.num_llm_layers:
        raise InputError(f"the injection config is for a {config.num_llm_layers}-layer LLM; {request.loaded.name} "
                         f"has {request.loaded.adapter.num_llm_layers}")
    return ScheduledModel(request.loaded, injection_schedule(config), "injection")


register(Method(
    name="injection", summary="visual tokens enter at one layer", config=InjectionConfig, flops=_flops,
    from_run=_from_run, run_kinds=("alignment", "similarity"),
    variants=(Variant("injection", "an injection config's entry layer on the dense weights", _variant,
                      needs="config", of="injection"),),
))
