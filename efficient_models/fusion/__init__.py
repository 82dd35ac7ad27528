"""Multi-layer visual feature fusion (Layer_Select_Fuse): the LLM reads several vision-tower layers, fused at
the input (E_D, one wider projector) or inside the LLM (I_D, one projector per extra layer added at the
image positions). Registers the `fusion` method: its config (a named layer set, or a `vision-layers` run's
recommended layers), its FLOPs count and the `fusion` bench variant (the config on the loaded model,
untrained: the extra layers start at zero). Training (`wb train fusion`) is not built yet.
"""

from efficient_models.fusion.config import FusionConfig
from efficient_models.fusion.cost import fusion_flops
from efficient_models.registry import Method, Variant, register
from workbench.errors import InputError


def _from_run(store) -> dict:
    if store.manifest["kind"] != "vision-layers":
        raise InputError(f"--method fusion needs a vision-layers run; {store.folder} is a "
                         f"{store.manifest['kind']!r} run")
    summary = store.read_json("summary")
    return {"layers": summary["recommended_layers"], "num_vision_layers": summary["num_vision_layers"]}


def _variant(request):
    from efficient_models.fusion.model import fusion_variant

    return fusion_variant(request.load_fresh(), request.config("fusion"))


register(Method(
    name="fusion", summary="several vision layers fused at the input or inside the LLM", config=FusionConfig,
    flops=fusion_flops, from_run=_from_run, run_kinds=("vision-layers",),
    variants=(Variant("fusion", "a fusion config on the loaded model, extra layers untrained (zero)", _variant,
                      needs="config", of="fusion"),),
))
