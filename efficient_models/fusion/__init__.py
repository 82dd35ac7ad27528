"""Multi-layer visual feature fusion (Layer_Select_Fuse): the LLM reads several vision-tower layers, fused at
the input (E_D, one wider projector) or inside the LLM (I_D, one projector per extra layer added at the
image positions). Registers the `fusion` method: its config (a named layer set, or a `vision-layers` run's
recommended layers), its FLOPs count, `wb train fusion` (input fusion, on the shared fine-tuning) and two
bench variants: `fusion`, a trained run, and `fusion-dropin`, a config on the loaded model untrained (the
extra layers at zero).
"""

from efficient_models.fusion.config import FUSED_MODEL_TYPE, FusionConfig
from efficient_models.fusion.cost import fusion_flops
from efficient_models.registry import Method, Variant, register
from efficient_models.token_schedule.finetune_command import finetune_command
from workbench.errors import InputError


def _from_run(store) -> dict:
    if store.manifest["kind"] != "vision-layers":
        raise InputError(f"--method fusion needs a vision-layers run; {store.folder} is a "
                         f"{store.manifest['kind']!r} run")
    summary = store.read_json("summary")
    return {"layers": summary["recommended_layers"], "num_vision_layers": summary["num_vision_layers"]}


def _trained(request):
    from efficient_models.fusion.model import load_fusion_run

    return load_fusion_run(request.run("fusion"), request.load_fresh())


def _dropin(request):
    from efficient_models.fusion.model import fusion_variant

    return fusion_variant(request.load_fresh(), request.config("fusion"), name="fusion-dropin")


def _check_run(run_dir):
    from efficient_models.fusion.model import check_fusion_run

    return check_fusion_run(run_dir)


register(Method(
    name="fusion", summary="several vision layers fused at the input or inside the LLM", config=FusionConfig,
    flops=fusion_flops, from_run=_from_run, run_kinds=("vision-layers",), check_run=_check_run,
    runs_on=lambda adapter: FUSED_MODEL_TYPE in adapter.model_classes,
    train=finetune_command("fusion", FusionConfig, "efficient_models.fusion.training",
                           "Fine-tune the default model (projector + LoRA) reading several vision layers at its input."),
    variants=(Variant("fusion", "a trained `wb train fusion` run", _trained, needs="run", of="fusion"),
              Variant("fusion-dropin", "a fusion config on the loaded model, extra layers untrained (zero)", _dropin,
                      needs="config", of="fusion")),
))
