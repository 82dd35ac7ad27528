"""What `wb bench` reports: per variant its accuracy, counted FLOPs, speed and memory against dense; as a
table on the console, `bench.json`, and an accuracy-vs-FLOPs plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from rich.console import Console
from rich.table import Table

from workbench.files import write_text_atomically
from workbench.flops import FlopsBreakdown

REPORT_FILE = "bench.json"
PLOT_FILE = "accuracy_vs_flops.html"


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
    description: str  # `BenchVariant.describe`: what the variant changes
    visual_tokens_per_layer: list[float]  # in each decoder layer's input
    average_visual_tokens: float
    prefill_flops: FlopsBreakdown  # mean per question, from each prompt's real length
    visual_side_flops: float  # mean per question: the LLM's prefill FLOPs above the same prompt without the image
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
    training_precision: str  # what the timed training step computed in ("bf16" autocast or "fp32")
    seconds: float
    variants: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    no_vision: Accuracy | None = None  # dense with the image's features zeroed: the floor of every vision gain

    def share_of_dense(self, variant: VariantResult) -> float | None:
        """The variant's accuracy over dense's."""
        dense = self.variants[0].accuracy
        if variant.accuracy is None or dense is None or dense.overall == 0:
            return None
        return variant.accuracy.overall / dense.overall

    def vision_gain_kept(self, variant: VariantResult) -> float | None:
        """The share of dense's vision gain (accuracy above no-vision) the variant keeps: the headline, since
        a high no-vision floor makes "% of dense" hide what a variant loses of what the image gives."""
        dense = self.variants[0].accuracy
        if variant.accuracy is None or dense is None or self.no_vision is None:
            return None
        gain = dense.overall - self.no_vision.overall
        return (variant.accuracy.overall - self.no_vision.overall) / gain if gain > 0 else None

    def visual_side_share(self, variant: VariantResult) -> float:
        """The variant's LLM compute on the image as a share of dense's (ViCA's "visual-side compute")."""
        return variant.visual_side_flops / self.variants[0].visual_side_flops

    def to_dict(self) -> dict:
        data = asdict(self)
        for variant, row in zip(self.variants, data["variants"]):
            row |= {"share_of_dense": self.share_of_dense(variant), "vision_gain_kept": self.vision_gain_kept(variant),
                    "visual_side_share": self.visual_side_share(variant)}
        return data


def speed(values: Sequence[float], dense: Sequence[float], unit: str, predicted: float) -> Speed:
    """Speedups per repeat against dense: dense / variant for times (unit "s"), variant / dense for rates."""
    ratios = [reference / value if unit == "s" else value / reference for value, reference in zip(values, dense)]
    measured = statistics.median(ratios)
    return Speed(statistics.median(values), unit, measured, predicted, measured / predicted)



def accuracy_flops_figure(report: BenchReport) -> go.Figure:
    """Accuracy against counted prefill FLOPs per question, one labelled point per variant."""
    variants = report.variants
    figure = go.Figure(go.Scatter(
        x=[variant.prefill_flops.total / 1e9 for variant in variants],
        y=[variant.accuracy.overall if variant.accuracy else None for variant in variants],
        text=[variant.name for variant in variants], mode="markers+text", textposition="top center",
        customdata=[variant.description for variant in variants],
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
    write_text_atomically(json_path, json.dumps(report.to_dict(), indent=2))
    accuracy_flops_figure(report).write_html(plot_path, include_plotlyjs=True)
    return json_path, plot_path


def print_report(report: BenchReport, console: Console) -> None:
    """Three tables: cost and accuracy, measured speedups against dense, accuracy per question type."""
    floor = "" if report.no_vision is None else f"; no vision (dense, image zeroed): {report.no_vision.overall:.1%}"
    cost = Table("variant", "tokens/layer", "accuracy", "vision gain kept", "% of dense", "GFLOPs", "visual side",
                 "predicted", "memory", title=f"{report.model} on {report.device}: {report.questions}",
                 caption="vision gain kept: (accuracy - no vision) / (dense - no vision)"
                         f"{floor}; visual tokens per layer; counted prefill GFLOPs per question, the LLM's share of "
                         f"them spent on the image against dense's (visual side), and the speedup they predict; "
                         f"memory ({report.memory_measure}) as a ratio to dense")
    speeds = Table("variant", "prefill", "decode", "train step",
                   title=f"Measured speedup vs dense (measured / predicted), batch {report.batch_size}, "
                         f"median of {report.repeats}")
    for variant in report.variants:
        accuracy = "-" if variant.accuracy is None else f"{variant.accuracy.overall:.1%}"
        kept, share = report.vision_gain_kept(variant), report.share_of_dense(variant)
        cost.add_row(variant.name, f"{variant.average_visual_tokens:.1f}", accuracy,
                     "-" if kept is None else f"{kept:.0%}", "-" if share is None else f"{share:.0%}",
                     f"{variant.prefill_flops.total / 1e9:.3g}", f"{report.visual_side_share(variant):.1%}",
                     f"{variant.prefill.predicted_speedup:.2f}x",
                     f"{variant.memory_ratio:.2f}x")
        speeds.add_row(variant.name, *(f"{figure.speedup:.2f}x ({figure.measured_over_predicted:.2f})"
                                       for figure in (variant.prefill, variant.decode, variant.training_step)))
    console.print(cost)
    console.print(speeds)
    dense = report.variants[0]
    console.print(f"dense: prefill {dense.prefill.median * 1000:.1f} ms per batch, decode "
                  f"{dense.decode.median:.1f} tokens/s, training step {dense.training_step.median * 1000:.1f} ms "
                  f"({report.training_precision}), "
                  f"memory {dense.memory_bytes / 2 ** 20:.1f} MiB")
    scored = [variant for variant in report.variants if variant.accuracy is not None]
    if scored:
        kinds = list(scored[0].accuracy.by_type)
        by_type = Table("variant", *kinds, title="accuracy per type")
        for variant in scored:
            by_type.add_row(variant.name, *(f"{variant.accuracy.by_type.get(kind, 0):.0%}" for kind in kinds))
        console.print(by_type)
