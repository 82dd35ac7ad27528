"""Late injection (EmbedLens): visual tokens enter the LLM at one layer; the layers before see text only.

Registers the `injection` method: its config (from an alignment or similarity run), its token schedule
as the `injection` bench variant, and its FLOPs count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from efficient_models.registry import Method, Variant, register
from efficient_models.token_schedule.schedule import TokenSchedule, schedule_flops
from workbench.configs import LayeredConfig
from workbench.errors import InputError



class InjectionConfig(LayeredConfig):
    method: Literal["injection"] = "injection"
    inject_layer: int

    @model_validator(mode="after")
    def _layers(self):
        self.check_layer(self.inject_layer, "inject_layer")
        return self


def injection_schedule(config: InjectionConfig, num_visual: int | None = None) -> TokenSchedule:
    return TokenSchedule(config.num_llm_layers, inject_layer=config.inject_layer, name="injection")


def _from_run(store) -> dict:
    kind = store.manifest["kind"]
    if kind not in ("alignment", "similarity"):
        raise InputError(f"--method injection needs an alignment or similarity run; {store.folder} is a {kind!r} run")
    summary = store.read_json("summary")
    layer = summary["recommended_injection_layer"] if kind == "alignment" else summary["recommendation"]["injection_layer"]
    return {"inject_layer": layer}


def _variant(request):
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    return ScheduledModel(request.loaded, injection_schedule(request.config("injection")), "injection")


register(Method(
    name="injection", summary="visual tokens enter at one layer", config=InjectionConfig,
    flops=schedule_flops(injection_schedule),
    from_run=_from_run, run_kinds=("alignment", "similarity"),
    variants=(Variant("injection", "an injection config's entry layer on the dense weights", _variant,
                      needs="config", of="injection"),),
))
