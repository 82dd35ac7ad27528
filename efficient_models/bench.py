"""`wb bench`: token schedules against dense on the same inputs, accuracy beside counted FLOPs and measured speed.

For each variant (a `ScheduledModel`; the first is dense), on the same probe-scene questions and batches:
- accuracy: exact match on `n` questions, overall and per question type;
- prefill FLOPs per question, counted (`workbench.flops`) from the schedule's keep counts and each prompt's
  real length, and the average visual tokens per layer;
- prefill latency from pixels (vision tower, projector, scheduled LLM, LM head on the last token), decode
  throughput over a fixed number of greedy steps, the time of one training step (forward and backward
  through projector and LLM), and memory (CUDA: peak allocated during prefill; CPU: KV-cache bytes after it).
Timed runs interleave the variants within each repeat (dense, a, b, dense, a, b, ...) so that drift in machine
speed hits all of them alike; every speed figure is the median over repeats of the speedup against dense in
the same repeat, next to the speedup the counted FLOPs predict.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import torch
from rich.console import Console
from rich.table import Table

from efficient_models import schedule as schedules
from efficient_models.hidrop import (
    BASELINES,
    ScheduledModel,
    baseline_model,
    hidrop_model,
    load_hidrop_run,
    read_run_config,
    visual_tokens_per_image,
)
from efficient_models.hidrop_training import answer_loss
from efficient_models.scheduled_llm import ScheduleCache, ScheduledOutput
from workbench.configs import HiDropConfig, load_config
from workbench.errors import InputError
from workbench.evaluation.vqa import Question, evaluate_vqa, select_questions
from workbench.flops import FlopsBreakdown, ModelShapes, decode_flops, prefill_flops, training_step_flops
from workbench.models import loading
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel
from workbench.recipes.sequences import IGNORE_INDEX, Conversation, tokenise_conversation

VARIANTS = ("dense", "fastv", "pdrop", "fastv-matched", "hidrop", "hidrop-dropin")
REPORT_FILE = "bench.json"
PLOT_FILE = "accuracy_vs_flops.html"
CUDA_PEAK = "cuda_peak_allocated_during_prefill"  # max_memory_allocated above what was allocated before
KV_CACHE = "kv_cache_bytes_after_prefill"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def stage_steps(progress: Progress | None, stage: str, total: int) -> Callable[[int], None]:
    """A callback that counts `count` more items of `stage` done and reports them to `progress`."""
    done = 0

    def step(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(stage, done, total)

    return step


# --- the variants ------------------------------------------------------------------------

def variant_names(names: Sequence[str]) -> list[str]:
    """The requested variants, each once, dense first (added when missing): every speed is relative to it."""
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return ["dense", *dict.fromkeys(name for name in names if name != "dense")]


def hidrop_schedule_config(hidrop_run: Path | None, hidrop_config: Path | None) -> HiDropConfig | None:
    """The HiDrop config the drop-in and matched variants use: the given file, else the run's config.yaml."""
    if hidrop_config is None:
        return None if hidrop_run is None else read_run_config(hidrop_run)
    config = load_config(hidrop_config)
    if not isinstance(config, HiDropConfig):
        raise InputError(f"{hidrop_config} is a {config.method!r} config, not hidrop")
    return config


def build_variants(names: Sequence[str], model_name: str = "default", hidrop_run: Path | None = None,
                   hidrop_config: Path | None = None) -> list[ScheduledModel]:
    """The named variants on `model_name`, dense first; every option is checked before a model loads.

    fastv-matched: FastV keeping as many visual tokens per layer on average as the HiDrop config;
    hidrop: the trained run (loaded into a second copy of the model, since applying it changes weights);
    hidrop-dropin: the HiDrop config's schedule on the dense weights.
    """
    names = variant_names(names)
    if "hidrop" in names and hidrop_run is None:
        raise InputError("variant hidrop needs --hidrop-run RUN_DIR, a finished `wb train hidrop` run")
    needing_config = [name for name in names if name in ("fastv-matched", "hidrop-dropin")]
    config = hidrop_schedule_config(hidrop_run, hidrop_config) if needing_config else None
    if needing_config and config is None:
        raise InputError(f"variant {needing_config[0]} needs --hidrop-config FILE.yaml or --hidrop-run RUN_DIR")
    if "hidrop" in names:
        read_run_config(hidrop_run)  # a wrong folder fails now, not after the dense model has loaded
    loaded = loading.load_model(model_name)
    variants = []
    for name in names:
        if name in BASELINES:
            variants.append(baseline_model(loaded, name))
        elif name == "hidrop-dropin":
            variants.append(hidrop_model(loaded, config, name=name))
        elif name == "fastv-matched":
            num_visual = visual_tokens_per_image(loaded)
            target = schedules.from_config(config, num_visual).average_visual_tokens(num_visual)
            matched = schedules.fastv_matched(loaded.adapter.num_llm_layers, target, num_visual)
            variants.append(ScheduledModel(loaded, matched, name))
        else:
            variants.append(load_hidrop_run(hidrop_run, loading.load_model(model_name)))
    return variants


# --- inputs --------------------------------------------------------------------------------

@dataclass
class BenchBatches:
    """The fixed batches every timing runs on, the same for every variant (one image per row)."""

    prompts: Mapping[str, torch.Tensor]  # left-padded prompts with pixels: prefill and decode
    training: Mapping[str, torch.Tensor]  # left-padded prompt + answer with the same pixels
    labels: torch.Tensor  # [batch, seq] of `training`: the token where supervised, IGNORE_INDEX elsewhere


def text_lengths(adapter: ArchitectureAdapter, inputs: Mapping[str, torch.Tensor]) -> list[int]:
    """Real (unpadded) non-visual tokens of each row."""
    real = inputs.get("attention_mask")
    real = torch.ones_like(inputs["input_ids"], dtype=torch.bool) if real is None else real.bool()
    return (real & ~adapter.visual_token_mask(inputs["input_ids"])).sum(1).tolist()


def left_pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.stack([torch.cat([row.new_full((width - len(row),), value), row]) for row in rows])


def probe_batches(loaded: LoadedModel, questions: Sequence[Question]) -> BenchBatches:
    """Timing batches of `questions`: their prompts as `build_inputs` makes them, and for training the same
    prompts followed by the answer and end of turn (`tokenise_conversation`, what `wb train` supervises)."""
    images = [scene.image for scene, _ in questions]
    prompts = build_inputs(loaded.processor, images, [pair.question for _, pair in questions], device=loaded.device)
    num_visual = int(loaded.adapter.visual_token_mask(prompts["input_ids"])[0].sum())
    conversations = [tokenise_conversation(loaded.processor, Conversation(row, ((pair.question, pair.answer),)),
                                           num_visual) for row, (_, pair) in enumerate(questions)]
    pad = loaded.processor.tokenizer.pad_token_id
    input_ids = left_pad([conversation.input_ids for conversation in conversations], pad)
    attention_mask = left_pad([torch.ones_like(conversation.input_ids) for conversation in conversations], 0)
    labels = left_pad([conversation.labels for conversation in conversations], IGNORE_INDEX)
    training = {"input_ids": input_ids.to(loaded.device), "attention_mask": attention_mask.to(loaded.device),
                "pixel_values": prompts["pixel_values"]}
    return BenchBatches(prompts, training, labels.to(loaded.device))


# --- what is timed -------------------------------------------------------------------------

def prefill(model: ScheduledModel, inputs: Mapping[str, torch.Tensor]) -> tuple[ScheduledOutput, torch.Tensor]:
    """What generation does before its first decode step: embeddings from pixels, the scheduled LLM filling
    its cache (ranked by the last token), the LM head on the last token; returns the output and that token."""
    adapter = model.loaded.adapter
    output = model.engine.forward(adapter.input_embeddings(inputs), inputs["input_ids"],
                                  inputs.get("attention_mask"), use_cache=True)
    return output, adapter.lm_head(output.hidden[:, -1]).argmax(-1)


def decode(model: ScheduledModel, cache: ScheduleCache, token: torch.Tensor, steps: int) -> None:
    """`steps` greedy steps from `token`, never stopping early, so every variant decodes the same count."""
    adapter = model.loaded.adapter
    for _ in range(steps):
        hidden = model.engine.decode(adapter.embed_tokens(token[:, None]), cache)
        token = adapter.lm_head(hidden[:, -1]).argmax(-1)


@contextmanager
def trainable(loaded: LoadedModel):
    """Projector and LLM weights require grad and the vision tower's do not, as when fine-tuning over a frozen
    tower; the flags are restored and the gradients dropped on the way out."""
    flags = {parameter: parameter.requires_grad for parameter in loaded.model.parameters()}
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(True)
    for parameter in loaded.adapter.vision_tower.parameters():
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        loaded.model.zero_grad(set_to_none=True)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def training_step(model: ScheduledModel, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Forward and backward of the answer tokens' cross entropy (no optimizer step); returns the loss."""
    loss = answer_loss(model.engine, model.loaded.adapter.input_embeddings(inputs), inputs["input_ids"], labels,
                       inputs.get("attention_mask"))
    loss.backward()
    model.loaded.model.zero_grad(set_to_none=True)  # gradients would only pile up: nothing steps on them
    return loss.detach()


def timed(device: torch.device, run: Callable[[], object]) -> float:
    """Wall seconds of `run()`, waiting for queued GPU work before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def prefill_seconds(model: ScheduledModel, inputs: Mapping[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return timed(model.loaded.device, lambda: prefill(model, inputs))


def decode_tokens_per_second(model: ScheduledModel, inputs: Mapping[str, torch.Tensor], steps: int) -> float:
    with torch.no_grad():
        output, token = prefill(model, inputs)
        seconds = timed(model.loaded.device, lambda: decode(model, output.cache, token, steps))
    return len(token) * steps / seconds


def training_step_seconds(model: ScheduledModel, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> float:
    with trainable(model.loaded):
        return timed(model.loaded.device, lambda: training_step(model, inputs, labels))


def kv_cache_bytes(cache: ScheduleCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.kv.layers)


def prefill_memory(model: ScheduledModel, inputs: Mapping[str, torch.Tensor]) -> tuple[int, str]:
    """Bytes a prefill needs and which measure they are: on CUDA the peak allocated above what was allocated
    before (weights, inputs), elsewhere the KV cache it leaves (CPU has no allocator statistics)."""
    device = model.loaded.device
    with torch.no_grad():
        if device.type != "cuda":
            return kv_cache_bytes(prefill(model, inputs)[0].cache), KV_CACHE
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        prefill(model, inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, CUDA_PEAK


def interleaved(variants: Sequence[ScheduledModel], measure: Callable[[ScheduledModel], float], repeats: int,
                step: Callable[[int], None]) -> list[list[float]]:
    """`measure(variant)` per variant per repeat, the variants in turn within each repeat, after one untimed
    warm-up run of each (first calls pay for allocation and kernel selection)."""
    for variant in variants:
        measure(variant)
        step()
    values: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for row, variant in zip(values, variants):
            row.append(measure(variant))
            step()
    return values


# --- the report ------------------------------------------------------------------------------

@dataclass
class Speed:
    """One speed figure of a variant against dense, measured in the same run."""

    median: float  # over repeats, in `unit`
    unit: str
    speedup: float  # median over repeats of dense time / variant time (the same repeat): > 1 is faster
    predicted_speedup: float  # dense FLOPs / variant FLOPs on the same batch
    measured_over_predicted: float


@dataclass
class Accuracy:
    overall: float
    by_type: dict[str, float]  # only the types that have questions, in QUESTION_TYPES order
    n: int


@dataclass
class VariantResult:
    name: str
    schedule: str  # `TokenSchedule.describe`
    visual_tokens_per_layer: list[int]
    average_visual_tokens: float
    prefill_flops: FlopsBreakdown  # mean per question, from each prompt's real length
    prefill: Speed
    decode: Speed
    training_step: Speed
    memory_bytes: int  # the report's memory_measure
    memory_ratio: float  # variant / dense
    accuracy: Accuracy | None = None


@dataclass
class BenchReport:
    model: str
    device: str
    questions: str  # what accuracy and FLOPs were measured on
    batch_size: int
    repeats: int
    decode_steps: int
    memory_measure: str  # CUDA_PEAK or KV_CACHE
    seconds: float
    variants: list[VariantResult]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def speed(values: Sequence[float], dense: Sequence[float], unit: str, predicted: float) -> Speed:
    """Speedups per repeat against dense: dense / variant for times (unit "s"), variant / dense for rates."""
    ratios = [reference / value if unit == "s" else value / reference for value, reference in zip(values, dense)]
    measured = statistics.median(ratios)
    return Speed(statistics.median(values), unit, measured, predicted, measured / predicted)


def vqa_accuracy(model: ScheduledModel, split: str, n: int, batch_size: int, max_new_tokens: int,
                 progress: Callable[[int, int], object]) -> Accuracy:
    """The variant's exact-match accuracy as `wb eval vqa` scores it (no references: dense is the reference)."""
    report = evaluate_vqa(model.loaded, split, n, batch_size, max_new_tokens, progress=progress, references=False,
                          generator=lambda inputs, image_ids, tokens: model.generate_text(inputs, tokens))
    return Accuracy(report.overall.model, {kind: score.model for kind, score in report.by_type.items()}, report.n)


def prompt_text_tokens(loaded: LoadedModel, questions: Sequence[Question]) -> list[int]:
    """Each question's prompt length in text tokens (what its prefill FLOPs are counted on)."""
    return [text_lengths(loaded.adapter, build_inputs(loaded.processor, [scene.image], [pair.question]))[0]
            for scene, pair in questions]


def benchmark(variants: Sequence[ScheduledModel], batches: BenchBatches, text_tokens: Sequence[int], repeats: int = 5,
              decode_steps: int = 16, accuracy: Mapping[str, Accuracy] | None = None, questions: str = "",
              progress: Progress | None = None) -> BenchReport:
    """Counted FLOPs, timings and memory of `variants` (dense first) on `batches`.

    `text_tokens`: the text tokens of every question's prompt (FLOPs per question are their mean);
    `accuracy`: each variant's score by name, measured beforehand (`run_probe_benchmark`).
    """
    started = time.perf_counter()
    dense = variants[0]
    shapes = ModelShapes.of_model(dense.loaded, image_size=tuple(batches.prompts["pixel_values"].shape[-2:]))
    num_visual = shapes.visual_tokens_per_image
    if dense.schedule.keep_counts(num_visual) != [num_visual] * shapes.num_llm_layers:
        raise InputError(f"the first variant must be dense (every visual token in every layer), not {dense.name!r}")
    counts = [variant.schedule.keep_counts(num_visual) for variant in variants]
    prompt_rows = text_lengths(dense.loaded.adapter, batches.prompts)
    training_rows = text_lengths(dense.loaded.adapter, batches.training)
    answer_tokens = (batches.labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()

    def per_question(keep: list[int]) -> FlopsBreakdown:
        by_length = {length: prefill_flops(shapes, length, keep) for length in set(text_tokens)}
        return FlopsBreakdown.mean([by_length[length] for length in text_tokens])

    def batch_flops(keep: list[int]) -> dict[str, float]:
        """Counted FLOPs of what each timing runs, over the batch's rows."""
        return {"prefill": sum(prefill_flops(shapes, length, keep).total for length in prompt_rows),
                "decode": sum(decode_flops(shapes, length, keep, decode_steps) for length in prompt_rows),
                "training": sum(training_step_flops(prefill_flops(shapes, length, keep, lm_head_tokens=answers))
                                for length, answers in zip(training_rows, answer_tokens))}

    flops = [batch_flops(keep) for keep in counts]
    stages = {
        "prefill": ("s", lambda variant: prefill_seconds(variant, batches.prompts)),
        "decode": ("tokens/s", lambda variant: decode_tokens_per_second(variant, batches.prompts, decode_steps)),
        "training": ("s", lambda variant: training_step_seconds(variant, batches.training, batches.labels)),
    }
    speeds: dict[str, list[Speed]] = {}
    for stage, (unit, measure) in stages.items():
        step = stage_steps(progress, f"timing {stage}", (repeats + 1) * len(variants))
        values = interleaved(variants, measure, repeats, step)
        speeds[stage] = [speed(row, values[0], unit, flops[0][stage] / variant_flops[stage])
                         for row, variant_flops in zip(values, flops)]
    memory = [prefill_memory(variant, batches.prompts) for variant in variants]
    results = [
        VariantResult(name=variant.name, schedule=variant.schedule.describe(num_visual), visual_tokens_per_layer=keep,
                      average_visual_tokens=variant.schedule.average_visual_tokens(num_visual),
                      prefill_flops=per_question(keep), prefill=speeds["prefill"][index],
                      decode=speeds["decode"][index], training_step=speeds["training"][index],
                      memory_bytes=memory[index][0], memory_ratio=memory[index][0] / memory[0][0],
                      accuracy=(accuracy or {}).get(variant.name))
        for index, (variant, keep) in enumerate(zip(variants, counts))
    ]
    return BenchReport(model=dense.loaded.name, device=str(dense.loaded.device),
                       questions=questions or f"{len(text_tokens)} prompts", batch_size=len(prompt_rows),
                       repeats=repeats, decode_steps=decode_steps, memory_measure=memory[0][1],
                       seconds=time.perf_counter() - started, variants=results,
                       notes=list(dict.fromkeys(note for variant in variants for note in variant.loaded.notes)))


def run_probe_benchmark(variants: Sequence[ScheduledModel], split: str = "test", n: int = 120, batch_size: int = 8,
                        repeats: int = 5, decode_steps: int = 16, max_new_tokens: int = 8,
                        progress: Progress | None = None) -> BenchReport:
    """Accuracy of every variant on `n` probe-scene questions of `split`, then `benchmark` on the first
    `batch_size` of them."""
    if n < 1 or batch_size < 1 or repeats < 1 or decode_steps < 1:
        raise InputError(f"n, batch size, repeats and decode steps must be at least 1 "
                         f"(got {n}, {batch_size}, {repeats}, {decode_steps})")
    started = time.perf_counter()
    questions = select_questions(split, n)
    accuracy = {}
    for variant in variants:
        stage = f"answering ({variant.name})"
        accuracy[variant.name] = vqa_accuracy(variant, split, n, batch_size, max_new_tokens,
                                              lambda done, total, stage=stage: progress and progress(stage, done, total))
    text_tokens = prompt_text_tokens(variants[0].loaded, questions)
    batches = probe_batches(variants[0].loaded, questions[:batch_size])
    report = benchmark(variants, batches, text_tokens, repeats, decode_steps, accuracy,
                       f"{len(questions)} {split} probe-scene questions", progress)
    report.seconds = time.perf_counter() - started
    return report


# --- output ----------------------------------------------------------------------------------

def accuracy_flops_figure(report: BenchReport) -> go.Figure:
    """Accuracy against counted prefill FLOPs per question, one labelled point per variant."""
    variants = report.variants
    figure = go.Figure(go.Scatter(
        x=[variant.prefill_flops.total / 1e9 for variant in variants],
        y=[variant.accuracy.overall if variant.accuracy else None for variant in variants],
        text=[variant.name for variant in variants], mode="markers+text", textposition="top center",
        customdata=[variant.schedule for variant in variants],
        hovertemplate="%{text}: %{y:.1%} at %{x:.2f} GFLOPs<br>%{customdata}<extra></extra>"))
    figure.update_layout(title=f"Accuracy vs prefill FLOPs: {report.model}, {report.questions}",
                         xaxis_title="counted prefill GFLOPs per question", yaxis_title="exact-match accuracy",
                         yaxis_tickformat=".0%")
    return figure


def write_report(report: BenchReport, out_dir: Path) -> tuple[Path, Path]:
    """`bench.json` and, next to it, the accuracy-vs-FLOPs plot (self-contained HTML: no network needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out_dir / REPORT_FILE, out_dir / PLOT_FILE
    json_path.write_text(json.dumps(report.to_dict(), indent=2))
    accuracy_flops_figure(report).write_html(plot_path, include_plotlyjs=True)
    return json_path, plot_path


def print_report(report: BenchReport, console: Console) -> None:
    """Three tables: cost and accuracy, measured speedups against dense, accuracy per question type."""
    cost = Table("variant", "tokens/layer", "accuracy", "GFLOPs", "predicted", "memory",
                 title=f"{report.model} on {report.device}: {report.questions}",
                 caption="visual tokens per layer; counted prefill GFLOPs per question and the speedup they predict; "
                         f"memory ({report.memory_measure}) as a ratio to dense")
    speeds = Table("variant", "prefill", "decode", "train step",
                   title=f"Measured speedup vs dense (measured / predicted), batch {report.batch_size}, "
                         f"median of {report.repeats}")
    for variant in report.variants:
        accuracy = "-" if variant.accuracy is None else f"{variant.accuracy.overall:.1%}"
        cost.add_row(variant.name, f"{variant.average_visual_tokens:.1f}", accuracy,
                     f"{variant.prefill_flops.total / 1e9:.3g}", f"{variant.prefill.predicted_speedup:.2f}x",
                     f"{variant.memory_ratio:.2f}x")
        speeds.add_row(variant.name, *(f"{figure.speedup:.2f}x ({figure.measured_over_predicted:.2f})"
                                       for figure in (variant.prefill, variant.decode, variant.training_step)))
    console.print(cost)
    console.print(speeds)
    dense = report.variants[0]
    console.print(f"dense: prefill {dense.prefill.median * 1000:.1f} ms per batch, decode "
                  f"{dense.decode.median:.1f} tokens/s, training step {dense.training_step.median * 1000:.1f} ms, "
                  f"memory {dense.memory_bytes / 2 ** 20:.1f} MiB")
    scored = [variant for variant in report.variants if variant.accuracy is not None]
    if scored:
        kinds = list(scored[0].accuracy.by_type)
        by_type = Table("variant", *kinds, title="accuracy per type")
        for variant in scored:
            by_type.add_row(variant.name, *(f"{variant.accuracy.by_type.get(kind, 0):.0%}" for kind in kinds))
        console.print(by_type)
