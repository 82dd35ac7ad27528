"""What the app's pages share: the model chosen in the sidebar, cached loads, and run-store reads.

Models and per-image reports live in `st.cache_resource` (one copy per process, shared by every
browser session); run-store tables in `st.cache_data`, keyed by the folder and its files' times so
a run that is still being written is read again. Nothing here computes: see `apps.compute`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from analyses.tokens import TokenRule
from apps.compute import ImageReport, explain_image, model_fingerprint, safe_name
from apps.rule_label import SHIPPED_RULE, rule_caption
from apps.run_root import run_root
from workbench.errors import FolderInUse, InputError, WorkbenchError
from workbench.models import loading
from workbench.models.default_model import default_cache_dir

MODEL_KEY = "model_name"  # what the sidebar asks for
ACTIVE_MODEL_KEY = "active_model"  # the last model that loaded
FAILURES_KEY = "model_failures"  # name -> the one-line reason it did not load
TABLES_SHOWN = ("layers", "conditions", "probes")  # run tables the pages draw (tokens.parquet can be large)
RULE_FILE = "token_rule.json"  # shipped beside the default model's trained weights


def cache_root() -> Path:
    """The workbench's cache folder: where the default model is cached, one level up."""
    return default_cache_dir().parent


# --- models -----------------------------------------------------------------------------

@st.cache_resource(show_spinner=False, max_entries=2)
def get_model(name: str) -> loading.LoadedModel:
    """Load once per process; a failure raises (and is not cached), so a retry tries again."""
    return loading.load_model(name)


def load_error_line(name: str, error: Exception) -> str:
    if isinstance(error, WorkbenchError):
        return str(error)
    first = str(error).splitlines()[0] if str(error) else ""
    return f"cannot load model {name!r}: {type(error).__name__}: {first}"


def model_sidebar() -> None:
    """The sidebar's model box: load what it names; on failure show the one-line reason and keep the last
    model that loaded (if any), so every page goes on working. A failure is remembered for that name (no
    new attempt on every click) until "Retry" is pressed."""
    st.sidebar.text_input("Model", value=os.environ.get("WB_APP_MODEL", "default"), key=MODEL_KEY,
                          help="'default' (the embedded DINOv2 + SmolLM2 model), a Hugging Face id or a local folder")
    name = st.session_state[MODEL_KEY].strip() or "default"
    failures = st.session_state.setdefault(FAILURES_KEY, {})
    if name in failures and st.sidebar.button("Retry", key="retry_model"):
        del failures[name]
    if name not in failures:
        try:
            with st.spinner(f"loading model {name} ..."):
                loaded = get_model(name)
        except Exception as error:  # noqa: BLE001 - any load failure is shown, and the app keeps running
            failures[name] = load_error_line(name, error)
        else:
            st.session_state[ACTIVE_MODEL_KEY] = name
            st.sidebar.caption(f"model **{name}**: {loaded.adapter.num_llm_layers} LLM layers")
            for note in loaded.notes:
                st.sidebar.warning(note)
            return
    st.sidebar.error(failures[name])
    previous = st.session_state.get(ACTIVE_MODEL_KEY)
    if previous:
        st.sidebar.caption(f"still showing model **{previous}**")


def active_model() -> loading.LoadedModel | None:
    """The model the pages work with: the sidebar's, or the last one that loaded."""
    name = st.session_state.get(ACTIVE_MODEL_KEY)
    if name is None:
        return None
    try:
        return get_model(name)
    except Exception:  # noqa: BLE001 - evicted and now unloadable: the sidebar says why
        return None


# --- token categories ---------------------------------------------------------------------

@st.cache_resource(show_spinner=False, max_entries=4)
def _model_key(_loaded: loading.LoadedModel, name: str, object_id: int) -> str:
    return f"{safe_name(name)}-{model_fingerprint(_loaded)}"


def model_key(loaded: loading.LoadedModel) -> str:
    """Names a model and its weights: the name plus a fingerprint of what a training run changes."""
    return _model_key(loaded, loaded.name, id(loaded))


def rule_folder(loaded: loading.LoadedModel) -> Path:
    return cache_root() / "app-runs" / model_key(loaded) / "tokens"


@dataclass(frozen=True)
class LabelRule:
    """The rule that labels a model's tokens, and where it came from (named on screen beside the shares)."""

    rule: TokenRule
    source: str

    @property
    def caption(self) -> str:
        return rule_caption(self.rule.to_dict(), self.source)


@st.cache_resource(show_spinner=False, max_entries=4)
def get_rule(_loaded: loading.LoadedModel, key: str) -> LabelRule:
    """The rule shipped with the default model, else the rule of a tokens run over the sample photos,
    made once into the cache folder (and read back from there afterwards)."""
    from analyses.tokens import analyze_tokens
    from workbench.data.image_sets import resolve_image_set
    from workbench.models.default_model import DEFAULT_WEIGHTS_DIR  # read at call time: tests point it elsewhere
    from workbench.store import RunStore

    shipped = DEFAULT_WEIGHTS_DIR / RULE_FILE
    if _loaded.name == loading.DEFAULT_MODEL_NAME and shipped.is_file():
        import json

        return LabelRule(TokenRule.from_dict(json.loads(shipped.read_text())), SHIPPED_RULE)
    folder = rule_folder(_loaded)
    if not (folder / "manifest.json").exists() or RunStore.load(folder).status != "complete":
        try:
            analyze_tokens(_loaded, resolve_image_set("samples"), str(folder))
        except FolderInUse:
            raise  # another session is making this very run: wait for it, never delete it
        except InputError:  # our own cache folder, left by another version of the analysis: start over
            shutil.rmtree(folder)
            analyze_tokens(_loaded, resolve_image_set("samples"), str(folder))
    rule = TokenRule.from_dict(RunStore.load(folder, kind="tokens").read_json("summary")["rule"])
    return LabelRule(rule, f"a tokens run over the sample photos (cached in {folder})")


def rule_for(loaded: loading.LoadedModel) -> LabelRule:
    key = model_key(loaded)
    with st.spinner("finding the token-category rule for this model (a tokens run over the sample photos, "
                    "once per model) ..."):
        return get_rule(loaded, key)


@st.cache_resource(show_spinner=False, max_entries=12)
def get_report(_loaded: loading.LoadedModel, _rule: TokenRule, key: str, image_key: str, prompt: str,
               _image: Any, _item: Any) -> ImageReport:
    return explain_image(_loaded, _rule, _image, prompt, _item)


# --- the run store ------------------------------------------------------------------------

@dataclass
class RunView:
    """A run folder's contents as plain values (cacheable): manifest, JSON summaries, tables."""

    folder: str
    manifest: dict
    jsons: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "?")

    @property
    def summary(self) -> dict:
        return self.jsons.get("summary", {})

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.folder}"


def folder_stamp(folder: str | Path) -> float:
    """Latest modification time of a run folder's top-level files: changes when a run writes results."""
    folder = Path(folder)
    times = [path.stat().st_mtime for path in folder.iterdir() if path.is_file()] if folder.is_dir() else []
    return max(times, default=0.0)


@st.cache_data(show_spinner=False, max_entries=64)
def _read_run(folder: str, stamp: float) -> RunView:
    from workbench.store import RunStore

    store = RunStore.load(folder)
    view = RunView(folder=folder, manifest=store.manifest)
    for path in sorted(Path(folder).glob("*.json")):
        if path.name != "manifest.json":
            view.jsons[path.stem] = store.read_json(path.stem)
    for name in TABLES_SHOWN:
        if (Path(folder) / f"{name}.parquet").exists():
            view.tables[name] = store.read_table(name)
    return view


@st.cache_data(show_spinner=False, max_entries=512)
def _read_manifest(folder: str, stamp: float) -> dict:
    from workbench.store import RunStore

    return RunStore.load(folder).manifest


def read_run(folder: str | Path) -> RunView:
    """A run folder, read through the cache; raises `InputError` (one line) if it is not a run."""
    return _read_run(str(folder), folder_stamp(folder))


def find_runs(root: str | Path, max_depth: int = 3) -> list[Path]:
    """Run folders (holding manifest.json) at or below `root`, up to `max_depth` levels down, nested runs
    (e.g. OUT/tokens) included; a run's own parts/ folder is not searched."""
    root = Path(root)
    found = []
    for folder, subfolders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if "manifest.json" in files:
            found.append(Path(folder))
        subfolders[:] = sorted(name for name in subfolders if name != "parts" and not name.startswith("."))
        if depth >= max_depth:
            subfolders.clear()
    return sorted(found)


def runs_root() -> str:
    return str(run_root())


def run_picker(label: str, kinds: tuple[str, ...] | None = None, key: str = "run", allow_none: bool = False,
               start_empty: bool = False) -> RunView | None:
    """A select box of the runs under the run root (optionally of some kinds), newest first, or a
    typed path. With `allow_none` it offers "(none)"; `start_empty` starts there instead of the newest run."""
    labels = {}
    for folder in sorted(find_runs(runs_root()), key=folder_stamp, reverse=True):
        try:
            kind = _read_manifest(str(folder), folder_stamp(folder)).get("kind", "?")
        except WorkbenchError:
            continue
        if kinds is None or kind in kinds:
            labels[str(folder)] = f"{kind}: {folder}"
    options = list(labels)
    typed = "(type a folder path)"
    if not options:
        st.caption(f"no {' / '.join(kinds) if kinds else ''} runs under `{runs_root()}` (the run root): "
                   f"make one with e.g. `wb analyze similarity --images probe:16 --out {runs_root()}/similarity`, "
                   f"or type a folder path")
    choices = ([None] if allow_none else []) + options + [typed]
    first = 1 if allow_none and options and not start_empty else 0
    chosen = st.selectbox(label, choices, index=first, key=key,
                          format_func=lambda folder: "(none)" if folder is None else labels.get(folder, folder))
    if chosen == typed:
        path = st.text_input(f"{label}: folder", key=f"{key}_path").strip()
        if not path:
            return None
        try:
            view = read_run(path)
        except (WorkbenchError, OSError) as error:
            st.error(str(error))
            return None
        if kinds is not None and view.kind not in kinds:
            st.error(f"{path} holds a {view.kind!r} run; this needs a {' or '.join(kinds)} run")
            return None
        return view
    if chosen is None:
        return None
    try:
        return read_run(chosen)
    except (WorkbenchError, OSError) as error:
        st.error(str(error))
        return None
