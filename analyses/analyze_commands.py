"""`wb analyze ...`: the batch analyses as commands. Each writes a run folder (see workbench.store)
and prints its headline numbers; the same command resumes an interrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from analyses.vica_layers_command import vica_layers
from workbench.console import MODEL_OPTION, console, load_with_notes
from workbench.errors import InputError
from workbench.output_paths import output_folder

analyze_app = typer.Typer(help="Batch analyses over image sets, written to resumable run folders.",
                          no_args_is_help=True)



def _image_set(value: str) -> str:
    """--images is resolved once when the options are parsed, so a bad set is one line before a model loads."""
    from workbench.data.image_sets import resolve_image_set

    resolve_image_set(value)
    return value


IMAGES_OPTION = typer.Option(..., "--images", callback=_image_set,
                             help="probe:N (validation scenes), probe:SPLIT:N, samples, or a folder.")
OUT_OPTION = typer.Option(..., "--out", help="Run folder; the same command resumes it.", callback=output_folder)
BATCH_OPTION = typer.Option(8, "--batch-size", min=1)


def _finished_tokens_run(value: str | None) -> str | None:
    """--tokens-run names a finished tokens run: read from its manifest when the options are parsed, so a
    wrong folder is one line before a model loads (workbench.store reads it fully later)."""
    if value is None:
        return value
    try:
        manifest = json.loads((Path(value) / "manifest.json").read_text())
    except (OSError, ValueError):
        raise InputError(f"--tokens-run {value} is not a run folder (no readable manifest.json); "
                         "make one with `wb analyze tokens`") from None
    if manifest.get("kind") != "tokens" or manifest.get("status") != "complete":
        raise InputError(f"--tokens-run {value} is a {manifest.get('status')} {manifest.get('kind')!r} run, not a "
                         "finished tokens run; finish it by running its command again")
    return value


TOKENS_RUN_OPTION = typer.Option(None, "--tokens-run", callback=_finished_tokens_run,
                                 help="A finished tokens run whose categories to use (default: run one now in OUT/tokens).")
JSON_OPTION = typer.Option(False, "--json", help="Print the summary as JSON.")


def _int_list(text: str | None) -> tuple[int, ...] | None:
    """"2,4,8" or "10-15" (inclusive) or a mix, for layers or ids; None stays None (the analysis picks)."""
    if text is None:
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            layers += range(int(first), int(last or first) + 1)
    except ValueError:
        raise InputError(f"bad list {text!r}: write e.g. 2,4,8 or 10-15") from None
    return tuple(layers)


def _print(summary: dict, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    elif table is not None:
        console.print(table)
    if summary.get("skipped_images") and not as_json:
        console.print(f"[yellow]skipped {len(summary['skipped_images'])} unreadable images[/] (listed in the manifest)")


def _images(source: str):
    from workbench.data.image_sets import resolve_image_set

    return resolve_image_set(source)


@analyze_app.command("tokens")
def tokens(
    model: str = MODEL_OPTION, images: str = IMAGES_OPTION, out: str = OUT_OPTION,
    rule: str = typer.Option("auto", help="auto (discover anchors) or embedlens (given anchors)."),
    sink_vit: str | None = typer.Option(None, help="For --rule embedlens: ViT-sink anchor ids, e.g. 1,7."),
    sink_llm: str | None = typer.Option(None, help="For --rule embedlens: LLM-sink anchor ids, e.g. 26673,1141."),
    dead: str | None = typer.Option(None, help="For --rule embedlens: dead anchor ids."),
    topk: int = typer.Option(3, min=1, help="Nearest vocabulary ids per token."),
    batch_size: int = BATCH_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Sink / dead / alive for every visual token, with the evidence and the rule that fired."""
    from analyses.tokens import TokensConfig, analyze_tokens

    if rule not in ("auto", "embedlens"):
        raise InputError(f"unknown --rule {rule!r}; choose auto or embedlens")
    given = {"sink_vit": _int_list(sink_vit), "sink_llm": _int_list(sink_llm), "dead": _int_list(dead)}
    anchors = {role: ids for role, ids in given.items() if ids}
    config = TokensConfig(rule=rule, anchors=anchors or None, topk=topk, batch_size=batch_size)
    image_set = _images(images)
    summary = analyze_tokens(load_with_notes(model), image_set, out, config)
    _print(summary, as_json, _fractions_table(summary, out))


def _fractions_table(summary: dict, out: str) -> Table:
    """Each category's share counted exclusively and as the reference's (overlapping) groups; the anchors."""
    table = Table("category", "exclusive", "reference groups",
                  title=f"{summary['num_tokens']} visual tokens of {summary['num_images']} images -> {out}",
                  caption="reference groups overlap (a token is in every group with an anchor among its top-k), "
                          "so they may sum past 100%")
    exclusive = summary["fractions"] | {f"sink_{source}": share for source, share in summary["sink_sources"].items()}
    for category, group_share in summary["group_fractions"].items():
        table.add_row(category, f"{exclusive[category]:.1%}", f"{group_share:.1%}")
    for anchor in summary["rule"]["anchors"]:
        near = "" if math.isnan(anchor["share"]) else f", near {anchor['share']:.0%}"  # NaN: a given anchor
        table.add_row(f"anchor {anchor['id']} {anchor['token']!r}", f"{anchor['role']}{near}", "")
    return table


@analyze_app.command("probe")
def probe(
    model: str = MODEL_OPTION, images: str = IMAGES_OPTION, out: str = OUT_OPTION,
    layers: str | None = typer.Option(None, help="LLM layers to probe after, e.g. 0,7,15 (default: 5 spread)."),
    questions: int = typer.Option(60, min=0, help="VQA questions for the compression test (0: skip it)."),
    tokens_run: str | None = TOKENS_RUN_OPTION, batch_size: int = BATCH_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Patch-compression benchmark: linear probes per category and layer; VQA with only alive tokens."""
    from analyses.probe import ProbeConfig, analyze_probe

    config = ProbeConfig(batch_size=batch_size, layers=_int_list(layers), vqa_questions=questions)
    summary = analyze_probe(load_with_notes(model), _images(images), out, config, tokens_run)
    table = None
    if summary["vqa"]:
        table = Table("condition", "VQA accuracy", title=f"{summary['vqa']['questions']} questions; alive fraction "
                                                         f"{summary['vqa']['alive_fraction']:.1%}")
        for name, accuracy in summary["vqa"]["accuracy"].items():
            table.add_row(name, f"{accuracy['overall']:.1%}")
    _print(summary, as_json, table)
    if not as_json:
        console.print(f"probe accuracies per layer, category and target: {out}/probes.parquet")


@analyze_app.command("alignment")
def alignment(
    model: str = MODEL_OPTION, images: str = IMAGES_OPTION, out: str = OUT_OPTION,
    tokens_run: str | None = TOKENS_RUN_OPTION, batch_size: int = BATCH_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Which LLM layer alive visual tokens already resemble: the recommended injection layer."""
    from analyses.alignment import AlignmentConfig, analyze_alignment

    summary = analyze_alignment(load_with_notes(model), _images(images), out, AlignmentConfig(batch_size=batch_size),
                                tokens_run)
    table = Table("measure", "value", title=f"layer alignment -> {out}")
    table.add_row("recommended injection layer", str(summary["recommended_injection_layer"]))
    table.add_row("separability there / at layer 0",
                  f"{summary['separability_at_recommended']:.2f} / {summary['separability_at_0']:.2f}")
    _print(summary, as_json, table)


@analyze_app.command("similarity")
def similarity(
    model: str = MODEL_OPTION, images: str = IMAGES_OPTION, out: str = OUT_OPTION,
    batch_size: int = BATCH_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Inter-layer similarity and the image's effect on text: injection, exit and pruning stages."""
    from analyses.similarity import SimilarityConfig, analyze_similarity

    summary = analyze_similarity(load_with_notes(model), _images(images), out, SimilarityConfig(batch_size=batch_size))
    recommendation = summary["recommendation"]
    table = Table("recommendation", "layer", title=f"inter-layer similarity -> {out}")
    table.add_row("inject visual tokens at", str(recommendation["injection_layer"]))
    table.add_row("drop them all at (exit)", str(recommendation["exit_layer"]))
    for stage in recommendation["stages"]:
        table.add_row(f"keep {stage['keep_fraction']:.0%} from", str(stage["start_layer"]))
    _print(summary, as_json, table)


@analyze_app.command("routing")
def routing(
    run: Path = typer.Option(..., "--run", help="A finished `wb train skipgpt` run folder (either stage)."),
    out: str = OUT_OPTION,
    blocks: int = typer.Option(64, "--blocks", min=1, help="Test blocks of the run's text to route."),
    batch_size: int = BATCH_OPTION,
    position_bins: int = typer.Option(8, "--position-bins", min=2, help="Equal bins of a block's token positions."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Where a SkipGPT run's routers spend compute: per layer, attention against MLP, by token position."""
    from analyses.routing import RoutingConfig, analyze_routing

    summary = analyze_routing(run, out, RoutingConfig(blocks=blocks, batch_size=batch_size,
                                                      position_bins=position_bins))
    table = Table("measure", "value", title=f"SkipGPT routing -> {out}")
    for key in ("attention_skipped", "mlp_skipped", "modules_skipped", "attention_more_redundant_than_mlp",
                "later_tokens_skip_less_attention", "later_tokens_skip_more_mlp"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    _print(summary, as_json, table)


@analyze_app.command("vision-layers")
def vision_layers(
    model: str = MODEL_OPTION, images: str = IMAGES_OPTION, out: str = OUT_OPTION,
    stage_similarity: float = typer.Option(0.85, help="Consecutive-layer CKA below which a new stage starts."),
    batch_size: int = BATCH_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Probes, norms and stages of every vision-tower layer: the layer set to feed the projector."""
    from analyses.vision_layers import VisionLayersConfig, analyze_vision_layers, require_probe_scenes

    config = VisionLayersConfig(batch_size=batch_size, stage_similarity=stage_similarity)
    image_set = require_probe_scenes(_images(images))  # before the model loads: a wrong set is one quick line
    summary = analyze_vision_layers(load_with_notes(model), image_set, out, config)
    _print(summary, as_json, _vision_layers_table(summary, out))


def _vision_layers_table(summary: dict, out: str) -> Table:
    """One row per tower layer: its stage, probe accuracy per target / majority, norms, and the picks."""
    import pandas as pd

    probes = pd.read_parquet(Path(out) / "probes.parquet")
    layers = pd.read_parquet(Path(out) / "layers.parquet")
    targets = list(dict.fromkeys(probes["target"]))
    table = Table("layer", "stage", *targets, "norm", "outliers", "pick",
                  title=f"vision-tower layers, {summary['num_images']} scenes -> {out}",
                  caption=f"probe accuracy / majority class. Recommended layers {summary['recommended_layers']} "
                          f"(*), base layer {summary['base_layer']}")
    cells = {(row.layer, row.target): "-" if math.isnan(row.accuracy) else f"{row.accuracy:.0%}/{row.majority:.0%}"
             for row in probes.itertuples()}
    for row in layers.itertuples():
        pick = "*" if row.layer in summary["recommended_layers"] else ""
        pick += " base" if row.layer == summary["base_layer"] else ""
        table.add_row(str(row.layer), str(row.stage), *(cells.get((row.layer, target), "-") for target in targets),
                      f"{row.mean_norm:.1f}", f"{row.outlier_share:.1%}", pick.strip())
    return table


@analyze_app.command("interventions")
def interventions(
    model: str = MODEL_OPTION, images: str = IMAGES_OPTION, out: str = OUT_OPTION,
    questions: int = typer.Option(60, min=1, help="Validation questions per condition."),
    skip_layers: str | None = typer.Option(None, help="Layers whose visual attention / MLP update is skipped."),
    exit_layers: str | None = typer.Option(None, help="Exit layers to try, e.g. 15,22."),
    inject_layers: str | None = typer.Option(None, help="Injection layers to try, e.g. 3,7."),
    groups: str = typer.Option("reference", help="reference (remove every token of a category's overlapping "
                                                 "reference group) or exclusive (of the exclusive category)."),
    control_from: str = typer.Option("alive", help="alive (as the reference) or all: where the random controls "
                                                   "draw from; that of 'remove alive' always draws from all."),
    tokens_run: str | None = TOKENS_RUN_OPTION, batch_size: int = BATCH_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """VQA accuracy when categories are removed, sublayers skipped, attention cut, or tokens enter late."""
    from analyses.interventions import InterventionsConfig, analyze_interventions

    config = InterventionsConfig(questions=questions, batch_size=batch_size, skip_layers=_int_list(skip_layers),
                                 exit_layers=_int_list(exit_layers), inject_layers=_int_list(inject_layers),
                                 groups=groups, control_from=control_from)
    summary = analyze_interventions(load_with_notes(model), _images(images), out, config, tokens_run)
    used = summary["group_fractions" if summary["groups"] == "reference" else "fractions"]
    table = Table("condition", "VQA accuracy", title=f"{summary['questions']} {summary['split']} questions -> {out}",
                  caption=f"categories as {summary['groups']} groups: "
                          + ", ".join(f"{category} {share:.1%}" for category, share in used.items()))
    for name, accuracy in summary["accuracy"].items():
        table.add_row(name, f"{accuracy:.1%}")
    _print(summary, as_json, table)


analyze_app.command("vica-layers")(vica_layers)


@analyze_app.command("report")
def report(runs: list[str] = typer.Argument(..., help="Finished run folders.")) -> None:
    """Print finished runs' headline numbers as Markdown tables."""
    from analyses.report import report as markdown

    for folder in runs:
        print(markdown(folder) + "\n")
