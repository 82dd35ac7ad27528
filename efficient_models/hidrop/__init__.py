"""HiDrop: late injection, concave pyramid pruning with early exit, differentiable top-k; trained with its
schedule active. Registers the `hidrop` method (variants `hidrop`, trained, and `hidrop-dropin`, its
schedule on the dense weights; `wb train hidrop`)."""

from efficient_models.hidrop.config import HiDropConfig
from efficient_models.hidrop.pyramid import hidrop_schedule, with_token_budget
from efficient_models.registry import Method, Variant, register
from efficient_models.token_schedule.finetune_command import finetune_command
from efficient_models.token_schedule.schedule import schedule_flops
from workbench.errors import InputError


def _from_run(store):
    if store.manifest["kind"] != "similarity":
        raise InputError(f"--method hidrop needs a similarity run; {store.folder} is a {store.manifest['kind']!r} run")
    recommendation = store.read_json("summary")["recommendation"]
    return {"inject_layer": recommendation["injection_layer"], "exit_layer": recommendation["exit_layer"],
            "stages": recommendation["stages"], "schedule_power": store.config["power"]}


def _trained(request):
    from efficient_models.hidrop.model import load_hidrop_run

    return load_hidrop_run(request.run("hidrop"), request.load_fresh())


def _dropin(request):
    from efficient_models.hidrop.model import hidrop_model

    return hidrop_model(request.loaded, request.config("hidrop"), name="hidrop-dropin")


def _check_run(run_dir):
    from efficient_models.hidrop.model import check_hidrop_run

    return check_hidrop_run(run_dir)


register(Method(
    name="hidrop", summary="late injection, pruning stages or the concave pyramid, early exit",
    config=HiDropConfig, flops=schedule_flops(hidrop_schedule), from_run=_from_run, run_kinds=("similarity",),
    train=finetune_command("hidrop", HiDropConfig, "efficient_models.hidrop.training",
                           "Fine-tune the default model (projector + LoRA) with a HiDrop schedule active."),
    check_run=_check_run, fit_budget=with_token_budget,
    variants=(Variant("hidrop", "a trained `wb train hidrop` run", _trained, needs="run", of="hidrop"),
              Variant("hidrop-dropin", "a hidrop config's schedule on the dense weights", _dropin,
                      needs="config", of="hidrop")),
))
