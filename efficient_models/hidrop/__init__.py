"""HiDrop: late injection, concave pyramid pruning with early exit, differentiable top-k; trained with its
schedule active. Registers the `hidrop` method (variants `hidrop`, trained, and `hidrop-dropin`, its
schedule on the dense weights; `wb train hidrop`)."""

from efficient_models.hidrop.commands import train_command
from efficient_models.hidrop.config import HiDropConfig
from efficient_models.registry import Method, Variant, register


def _flops(config, shapes, text_tokens, answer_tokens=1, decode_steps=1):
    from efficient_models.hidrop.pyramid import hidrop_schedule
    from workbench.flops import token_schedule_flops

    counts = hidrop_schedule(config, shapes.visual_tokens_per_image).keep_counts(shapes.visual_tokens_per_image)
    return token_schedule_flops(shapes, text_tokens, counts, answer_tokens, decode_steps)


def _from_run(store):
    from workbench.errors import InputError

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


def _fit_budget(config, budget):
    from efficient_models.hidrop.pyramid import with_token_budget

    return with_token_budget(config, budget)


def _check_run(run_dir):
    from efficient_models.hidrop.model import check_hidrop_run

    return check_hidrop_run(run_dir)


register(Method(
    name="hidrop", summary="late injection, pruning stages or the concave pyramid, early exit",
    config=HiDropConfig, flops=_flops, from_run=_from_run, run_kinds=("similarity",), train=train_command,
    check_run=_check_run, fit_budget=_fit_budget,
    variants=(Variant("hidrop", "a trained `wb train hidrop` run", _trained, needs="run", of="hidrop"),
              Variant("hidrop-dropin", "a hidrop config's schedule on the dense weights", _dropin,
                      needs="config", of="hidrop")),
))
