"""`wb bench` end to end: accuracy on probe-scene questions, then counted FLOPs, timings and memory.

For each variant (the first is dense), on the same questions and batches:
- accuracy: exact match on `n` questions, overall and per question type, as `wb eval vqa` scores it;
- FLOPs per question, counted by the variant (`BenchVariant.flops`) from each prompt's real length;
- prefill latency from pixels, decode throughput over a fixed number of greedy steps, the time of one
  training step (forward and backward through projector and LLM), and memory (CUDA: peak allocated
  during prefill; CPU: the cache it leaves).
Every speed figure is the median over repeats of the speedup against dense in the same repeat, next to
the speedup the counted FLOPs predict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from efficient_models.bench.probe_inputs import (
    BenchBatches,
    answer_lengths,
    probe_batches,
    prompt_text_tokens,
    text_lengths,
)
from efficient_models.bench.results import Accuracy, BenchReport, Speed, VariantResult, speed
from efficient_models.bench.timing import (
    decode_tokens_per_second,
    interleaved,
    prefill_memory,
    prefill_seconds,
    training_step_seconds,
)
from efficient_models.bench.variants import REFERENCE
from efficient_models.variant import BenchVariant
from workbench.errors import InputError
from workbench.evaluation.vqa import evaluate_vqa, select_questions
from workbench.flops import FlopsBreakdown, ModelShapes, batch_image_size, prefill_flops
from workbench.training.precision import resolve_precision

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def stage_steps(progress: Progress | None, stage: str, total: int) -> Callable[[], None]:
    """A callback that counts one more item of `stage` done and reports it to `progress`."""
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(stage, done, total)

    return step


def vqa_accuracy(variant: BenchVariant, split: str, n: int, batch_size: int, max_new_tokens: int,
                 progress: Callable[[int, int], object], no_vision: bool = False) -> tuple[Accuracy, Accuracy | None]:
    """The variant's exact-match accuracy as `wb eval vqa` scores it and, with `no_vision`, that of its model
    with the image's features zeroed (asked of dense only: the floor every vision gain is measured from)."""
    report = evaluate_vqa(variant.loaded, split, n, batch_size, max_new_tokens, progress=progress,
                          references=no_vision,
                          generator=lambda inputs, image_ids, tokens: variant.generate_text(inputs, tokens))

    def accuracy(field: str) -> Accuracy:
        return Accuracy(getattr(report.overall, field),
                        {kind: getattr(score, field) for kind, score in report.by_type.items()}, report.n)
    return accuracy("model"), accuracy("no_vision") if no_vision else None


def batch_flops(variant: BenchVariant, shapes: ModelShapes, batches: BenchBatches, decode_steps: int) -> dict[str, float]:
    """Counted FLOPs of what each timing runs, summed over the batch's rows."""
    adapter = variant.loaded.adapter
    prompts = [variant.flops(shapes, length, decode_steps=decode_steps)
               for length in text_lengths(adapter, batches.prompts)]
    training = [variant.flops(shapes, length, answer_tokens=answers).training_step
                for length, answers in zip(text_lengths(adapter, batches.training), answer_lengths(batches.labels))]
    return {"prefill": sum(count.prefill.total for count in prompts),
            "decode": sum(count.decode.total for count in prompts),
            "training": sum(breakdown.total for breakdown in training)}


def benchmark(variants: Sequence[BenchVariant], batches: BenchBatches, text_tokens: Sequence[int], repeats: int = 5,
              decode_steps: int = 16, accuracy: Mapping[str, Accuracy] | None = None, questions: str = "",
              progress: Progress | None = None, no_vision: Accuracy | None = None) -> BenchReport:
    """Counted FLOPs, timings and memory of `variants` (dense first) on `batches`.

    `text_tokens`: the text tokens of every question's prompt (FLOPs per question are their mean);
    `accuracy`: each variant's score by name, measured beforehand (`run_probe_benchmark`); `no_vision`:
    dense's score without the image, measured with it.
    """
    started = time.perf_counter()
    dense = variants[0]
    if dense.name != REFERENCE:
        raise InputError(f"the first variant must be {REFERENCE} (every ratio is taken against it), not {dense.name!r}")
    shapes = ModelShapes.of_model(dense.loaded, image_size=batch_image_size(batches.prompts, dense.loaded.processor))
    flops = [batch_flops(variant, shapes, batches, decode_steps) for variant in variants]
    precision = resolve_precision("auto", dense.loaded.device)  # once, as a training run resolves it
    stages = {
        "prefill": ("s", lambda variant: prefill_seconds(variant, batches.prompts)),
        "decode": ("tokens/s", lambda variant: decode_tokens_per_second(variant, batches.prompts, decode_steps)),
        "training": ("s", lambda variant: training_step_seconds(variant, batches.training, batches.labels, precision)),
    }
    speeds: dict[str, list[Speed]] = {}
    for stage, (unit, measure) in stages.items():
        step = stage_steps(progress, f"timing {stage}", (repeats + 1) * len(variants))
        values = interleaved(variants, measure, repeats, step)
        speeds[stage] = [speed(row, values[0], unit, flops[0][stage] / variant_flops[stage])
                         for row, variant_flops in zip(values, flops)]
    memory = [prefill_memory(variant, batches.prompts) for variant in variants]
    results = []
    # A question's LLM FLOPs with no visual token anywhere: what is left of a variant's LLM FLOPs above it is the
    # compute it spends on the image (visual tokens in layers, their ranking, cross-attention to them).
    text_only = {length: prefill_flops(shapes, length, [0] * shapes.num_llm_layers).llm for length in set(text_tokens)}
    for index, variant in enumerate(variants):
        counts = {length: variant.flops(shapes, length) for length in set(text_tokens)}
        per_question = [counts[length] for length in text_tokens]
        results.append(VariantResult(
            name=variant.name, description=variant.describe(shapes),
            visual_tokens_per_layer=per_question[0].visual_tokens_per_layer,
            average_visual_tokens=per_question[0].average_visual_tokens,
            prefill_flops=FlopsBreakdown.mean([count.prefill for count in per_question]),
            visual_side_flops=sum(counts[length].prefill.llm - text_only[length] for length in text_tokens)
            / len(text_tokens),
            prefill=speeds["prefill"][index], decode=speeds["decode"][index], training_step=speeds["training"][index],
            memory_bytes=memory[index][0], memory_ratio=memory[index][0] / memory[0][0],
            accuracy=(accuracy or {}).get(variant.name)))
    return BenchReport(model=dense.loaded.name, device=str(dense.loaded.device),
                       questions=questions or f"{len(text_tokens)} prompts", batch_size=len(batches.labels),
                       repeats=repeats, decode_steps=decode_steps, memory_measure=memory[0][1],
                       training_precision=precision, no_vision=no_vision,
                       seconds=time.perf_counter() - started, variants=results,
                       notes=list(dict.fromkeys(note for variant in variants for note in variant.loaded.notes)))


def run_probe_benchmark(variants: Sequence[BenchVariant], split: str = "test", n: int = 120, batch_size: int = 8,
                        repeats: int = 5, decode_steps: int = 16, max_new_tokens: int = 8,
                        progress: Progress | None = None) -> BenchReport:
    """Accuracy of every variant on `n` probe-scene questions of `split`, then `benchmark` on the first
    `batch_size` of them."""
    if n < 1 or batch_size < 1 or repeats < 1 or decode_steps < 1:
        raise InputError(f"n, batch size, repeats and decode steps must be at least 1 "
                         f"(got {n}, {batch_size}, {repeats}, {decode_steps})")
    started = time.perf_counter()
    questions = select_questions(split, n)
    accuracy, no_vision = {}, None
    for index, variant in enumerate(variants):
        stage = f"answering ({variant.name}{', then without the image' if index == 0 else ''})"
        accuracy[variant.name], blind = vqa_accuracy(
            variant, split, n, batch_size, max_new_tokens,
            lambda done, total, stage=stage: progress and progress(stage, done, total), no_vision=index == 0)
        no_vision = no_vision or blind
    text_tokens = prompt_text_tokens(variants[0].loaded, questions)
    batches = probe_batches(variants[0].loaded, questions[:batch_size])
    report = benchmark(variants, batches, text_tokens, repeats, decode_steps, accuracy,
                       f"{len(questions)} {split} probe-scene questions", progress, no_vision)
    report.seconds = time.perf_counter() - started
    return report
