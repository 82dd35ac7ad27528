"""README's support table: what runs on each architecture, derived from declarations, never from model names.

Rows are the architectures (config `model_type`) with an adapter (`workbench.models.adapter`). Columns read:
- the adapter's capability flags: `token_schedules` for token schedules, and each analysis's needs as
  `analyses.requirements` declares them (the app makes a tokens run, so it needs what that analysis needs);
- the method registry (`efficient_models.registry`): a method with a model says which adapters it `runs_on`; one
  that is registered without a model, or not registered at all, is "not built".
`wb support-table --readme README.md` writes the table between README's markers, and tests/test_support_table.py
fails when README's copy differs from what the code declares.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from analyses.requirements import ANALYSIS_NEEDS
from efficient_models import registry
from workbench.errors import InputError
from workbench.models.adapter import ArchitectureAdapter, adapter_class_for, supported_model_types

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
APP_ANALYSIS = "tokens"  # the app colours patches from a tokens run; the jobs it starts carry their own needs
SCHEDULE_NEEDS = ("token_schedules",)  # what the token-schedule engine checks before it runs a model
FLAG_MEANINGS = {
    "token_schedules": "input embeddings and rotary position ids built outside the model",
    "tower_hidden_states": "a vision tower that returns its per-layer hidden states",
}

Adapter = type[ArchitectureAdapter]


def _yes_no(supported: bool) -> str:
    return "yes" if supported else "no"


def _has(adapter: Adapter, flags: tuple[str, ...]) -> bool:
    return all(getattr(adapter, flag) for flag in flags)


def _analyses(adapter: Adapter) -> str:
    refused = [name for name, needs in ANALYSIS_NEEDS.items() if not _has(adapter, needs)]
    return f"all but {', '.join(refused)}" if refused else "all"


def _method(name: str) -> Callable[[Adapter], str]:
    def cell(adapter: Adapter) -> str:
        method = registry.methods().get(name)
        if method is None:
            return "not built"
        if not (method.variants or method.train):
            return "not built (config only)"
        if method.runs_on is None:
            raise ValueError(f"method {name!r} has a model but does not declare the adapters it `runs_on`")
        return _yes_no(method.runs_on(adapter))

    return cell


COLUMNS: dict[str, Callable[[Adapter], str]] = {
    "inspect": lambda adapter: "yes",  # tracing reads only the parts every adapter names
    "analyses": _analyses,
    "app": lambda adapter: _yes_no(_has(adapter, ANALYSIS_NEEDS[APP_ANALYSIS])),
    "schedules": lambda adapter: _yes_no(_has(adapter, SCHEDULE_NEEDS)),
    "ViCA": _method("vica"),
    "fusion": _method("fusion"),
    "SkipGPT": _method("skipgpt"),
}


def _legend() -> list[str]:
    """What each flag an analysis or the schedules need means, and who needs it."""
    needed_by = {flag: ["token schedules"] for flag in SCHEDULE_NEEDS}
    for analysis, flags in ANALYSIS_NEEDS.items():
        for flag in flags:
            needed_by.setdefault(flag, []).append(f"`wb analyze {analysis}`")
    return [f"- `{flag}` ({FLAG_MEANINGS[flag]}): {', '.join(users)}" for flag, users in needed_by.items()]


def render_table() -> str:
    """The support table as Markdown, with a legend of the adapter flags it reads."""
    lines = [f"| architecture | {' | '.join(COLUMNS)} |", f"| --- |{' --- |' * len(COLUMNS)}"]
    for model_type in supported_model_types():
        adapter = adapter_class_for(model_type)
        cells = [cell(adapter) for cell in COLUMNS.values()]
        lines.append(f"| `{adapter.model_classes[model_type]}` (`{model_type}`) | {' | '.join(cells)} |")
    lines += ["", "Adapter flags the columns read, and what needs them:", *_legend()]
    return "\n".join(lines)


def _split(text: str, source: str) -> tuple[str, str, str]:
    """(before the start marker, the region between the markers, from the end marker on)."""
    before, start, rest = text.partition(START)
    region, end, after = rest.partition(END)
    if not (start and end):
        raise InputError(f"{source} has no {START} ... {END} markers around a support table")
    return before, region, end + after


def readme_table(path: Path) -> str:
    """The table README holds between its markers."""
    return _split(path.read_text(encoding="utf-8"), str(path))[1].strip("\n")


def rewrite_readme(path: Path) -> bool:
    """Put the current table between the markers of `path`, keeping the rest; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    before, _, after = _split(text, str(path))
    updated = f"{before}{START}\n{render_table()}\n{after}"
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text
