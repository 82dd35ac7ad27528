"""The browser app (apps/): its pure helpers, and every page driven through Streamlit's AppTest on the
default model, with synthetic run folders standing in for finished analyses."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from apps import state
from apps.compute import explain_image, logit_lens, model_fingerprint
from apps.explorer import picked_upload, probe_item
from apps.export_page import config_yaml, validate
from apps.charts import attention_heatmap, fractions_figure, similarity_figure
from apps.jobs import job_status, log_path, progress_of, start_job
from apps.overlay import overlay_figure, selected_token
from apps.palette import CATEGORY_COLOURS, OUTLINE, SEQUENTIAL, is_theme_placeholder, translucent
from apps.rule_label import SHIPPED_RULE
from apps.run_root import path_under_root
from apps.runs_page import compare_table, headline
from apps.uploads import image_from_upload
from efficient_models.hidrop.config import HiDropConfig
from efficient_models.registry import load_config
from workbench.errors import InputError
from workbench.store import RunStore

APP = Path(__file__).resolve().parents[1] / "apps" / "workbench_app.py"
LAYERS = 30
TIMEOUT = 180  # seconds per AppTest run: the first explorer run traces and generates on one core


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- synthetic run folders ---------------------------------------------------------------

def _run(folder, kind, tables, summary, config=None):
    store = RunStore.open(folder, kind=kind, model="default", data="probe:4", config=config or {})
    for name, table in tables.items():
        store.write_table(name, table)
    store.write_json("summary", summary)
    store.finish(num_llm_layers=LAYERS)
    return folder


RULE = {"kind": "embedlens", "topk": 3, "z_threshold": 3.5, "stats": {},
        "anchors": [{"id": 1, "token": "a", "role": "sink_vit", "share": 0.1, "coverage": 1.0, "consistency": 0.9}]}


def write_runs(root: Path) -> dict[str, Path]:
    layers = np.arange(LAYERS)
    effect = np.clip((layers - 3) / 12, 0, 1) * 0.4
    runs = {
        "tokens": _run(root / "tokens", "tokens", {}, {
            "num_images": 4, "num_tokens": 1024, "fractions": {"sink": 0.02, "dead": 0.28, "alive": 0.70},
            "alive_per_image": {"min": 0.6, "median": 0.7, "max": 0.8}, "rule": RULE}),
        "tokens2": _run(root / "tokens2", "tokens", {}, {
            "num_images": 4, "num_tokens": 1024, "fractions": {"sink": 0.01, "dead": 0.49, "alive": 0.50},
            "alive_per_image": {"min": 0.4, "median": 0.5, "max": 0.6}, "rule": RULE}, config={"topk": 5}),
        "similarity": _run(root / "similarity", "similarity", {"layers": pd.DataFrame({
            "layer": layers, "visual_self_cos": 0.9 + 0.003 * layers, "text_self_cos": 0.8 + 0.005 * layers,
            "vision_effect": effect})}, {
            "num_images": 4, "recommendation": {
                "injection_layer": 4, "exit_layer": 14, "passive_layers": [0, 1, 2, 3], "peak_vision_effect": 0.4,
                "stages": [{"start_layer": 4, "keep_fraction": 1.0}, {"start_layer": 7, "keep_fraction": 0.49},
                           {"start_layer": 11, "keep_fraction": 0.09}]}}, config={"power": 2.0}),
        "alignment": _run(root / "alignment", "alignment", {"layers": pd.DataFrame({
            "layer": layers, "separability": 1 - 0.01 * layers, "log10_norm_ratio": -0.02 * layers,
            "centroid_cos": 0.01 * layers, "logit_lens_hit": 0.005 * layers})}, {
            "recommended_injection_layer": 29, "separability_at_recommended": 0.71, "separability_at_0": 1.0}),
        "interventions": _run(root / "interventions", "interventions", {"conditions": pd.DataFrame({
            "condition": ["all tokens", "remove dead"], "overall": [0.61, 0.58]})}, {
            "questions": 60, "split": "val", "accuracy": {"all tokens": 0.61, "remove dead": 0.58}}),
        "probe": _run(root / "probe", "probe", {"probes": pd.DataFrame({
            "layer": ["input", "input"], "target": ["shape", "shape"], "category": ["all", "alive"],
            "train_tokens": [50, 40], "test_tokens": [20, 15], "accuracy": [0.8, 0.85],
            "majority_accuracy": [0.3, 0.3]})}, {
            "num_images": 4, "vqa": {"questions": 60, "split": "val", "alive_fraction": 0.7,
                                     "accuracy": {"all tokens": {"overall": 0.6}, "alive only": {"overall": 0.55}}}}),
    }
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return write_runs(tmp_path_factory.mktemp("runs"))


# --- uploads -------------------------------------------------------------------------------

def png_bytes(size=(32, 24), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_UPLOADS = {
    "notes.txt": (b"just some text, not an image\n", "not an image"),
    "broken.png": (png_bytes((64, 64))[:60], "cannot read uploaded image broken.png"),
    "dot.png": (png_bytes((1, 1)), "1x1 px, too small"),
    "empty.png": (b"", "empty"),
}


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_a_bad_upload_raises_one_line_naming_the_file(name):
    data, expected = BAD_UPLOADS[name]
    with pytest.raises(InputError, match=expected) as error:
        image_from_upload(name, data)
    assert name in str(error.value) and "\n" not in str(error.value)


def test_a_good_upload_becomes_an_rgb_image_keyed_by_its_content():
    picked = picked_upload("red.png", png_bytes())
    again = picked_upload("renamed.png", png_bytes())
    other = picked_upload("blue.png", png_bytes(colour=(0, 0, 255)))
    assert picked.image.mode == "RGB" and picked.image.size == (32, 24)
    assert picked.key == again.key != other.key and picked.item.id == "red.png"


def _common(layers=LAYERS):
    return {"model": "default", "num_llm_layers": layers,
            "provenance": {"run": "r", "kind": "similarity", "model": "default", "data": "d", "exported": "now"}}


# --- export: validation and YAML -------------------------------------------------------------

def test_export_validation_reports_each_problem_and_valid_yaml_loads_back(tmp_path):
    data = HiDropConfig(**_common(), inject_layer=4, exit_layer=14, schedule_power=2.0,
                        stages=[{"start_layer": 4, "keep_fraction": 1.0}]).model_dump(mode="json")
    config, errors = validate(data | {"exit_layer": 3, "schedule_power": -1})
    assert config is None and len(errors) == 1 and errors[0].startswith("schedule_power:")
    config, errors = validate(data | {"exit_layer": 3})
    assert config is None and len(errors) == 1 and "exit_layer 3 must come after inject_layer 4" in errors[0]
    config, errors = validate(data)
    assert errors == [] and isinstance(config, HiDropConfig)
    path = tmp_path / "hidrop.yaml"
    path.write_text(config_yaml(config))
    assert load_config(path) == config


# --- wb app ----------------------------------------------------------------------------------

def test_wb_app_serves_the_app_script_and_prints_its_url(run_wb, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("apps.app_command.run_until_stopped", lambda argv, env: calls.append((argv, env)) or 0)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_wb("app", "--port", "8600", "--model", "some/model", "--runs-dir", "my-runs")
    assert code == 0 and "http://localhost:8600" in out
    (argv, env), = calls
    assert argv[1:4] == ["-m", "streamlit", "run"] and Path(argv[4]) == APP
    assert argv[argv.index("--server.port") + 1] == "8600" and env["WB_APP_MODEL"] == "some/model"
    assert env["WB_RUNS_DIR"] == str(tmp_path / "my-runs")  # absolute: the app's working directory may differ


# --- colours ----------------------------------------------------------------------------------

def _tokens(categories: list[str]) -> pd.DataFrame:
    """A 2-wide grid of visual tokens with the columns the overlay's hover text reads."""
    count = len(categories)
    return pd.DataFrame({
        "token": range(count), "row": [i // 2 for i in range(count)], "col": [i % 2 for i in range(count)],
        "category": categories, "sink_source": "", "topk_tokens": [["a"]] * count, "topk_cos": [[0.5]] * count,
        "input_norm": 1.0, "vision_norm": 2.0, "llm_norm": 3.0, "attention_received": 0.01, "reason": "test"})


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_each_category_is_one_outlined_trace_in_the_colour_of_its_legend_and_bars():
    figure = overlay_figure(Image.new("RGB", (32, 32)), _tokens(["sink", "dead", "alive", "alive"]), 2, 2, opacity=0.4)
    traces = figure.data[1:]
    assert [trace.name for trace in traces] == ["sink (1)", "dead (1)", "alive (2)"]
    for trace, colour in zip(traces, CATEGORY_COLOURS.values()):
        assert trace.marker.color == translucent(colour, 0.4) and trace.showlegend is not False
        assert trace.marker.line.color == OUTLINE and trace.marker.line.width >= 1  # readable on any photo
    bars = fractions_figure({"sink": 0.25, "dead": 0.25, "alive": 0.5}).data[0]
    assert list(bars.marker.color) == list(CATEGORY_COLOURS.values())


def test_no_figure_uses_a_colour_the_streamlit_theme_replaces_in_the_browser():
    layers = pd.DataFrame({"layer": range(4), "visual_self_cos": 0.9, "text_self_cos": 0.8, "vision_effect": 0.1})
    image, tokens = Image.new("RGB", (32, 32)), _tokens(["sink", "dead", "alive", "alive"])
    figures = [attention_heatmap(np.zeros((3, 4))), fractions_figure({"sink": 0.1, "dead": 0.2, "alive": 0.7}),
               similarity_figure(layers, {"recommendation": {"injection_layer": 1, "exit_layer": 3}}),
               overlay_figure(image, tokens, 2, 2), overlay_figure(image, tokens, 2, 2, colour_by="input_norm")]
    # The theme's own template holds the placeholders by design: look at the data and the rest of the layout.
    colours = _strings([[figure.to_plotly_json()["data"], figure.layout.to_plotly_json() | {"template": None}]
                        for figure in figures])
    assert "#440154" in colours  # the scale is spelt out, so its colours are in the figure
    assert not [colour for colour in colours if is_theme_placeholder(colour)]


# --- writing under the run root: names, job logs, job progress ---------------------------------

@pytest.mark.parametrize("name", ["../../etc", "/etc/x", "a/../../b", "a/..", "..", ".", "", "  ", "~/x", "x\0y"])
def test_a_name_that_leaves_the_run_root_is_refused_in_one_line(tmp_path, name):
    with pytest.raises(InputError) as error:
        path_under_root(tmp_path / "root", name)
    assert "\n" not in str(error.value)


def test_a_name_under_the_run_root_is_a_path_inside_it(tmp_path):
    root = tmp_path / "root"
    assert path_under_root(root, "tokens-1") == root / "tokens-1"
    assert path_under_root(root, " configs/hidrop.yaml ") == root / "configs" / "hidrop.yaml"
    (tmp_path / "outside").mkdir()
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "outside")  # inside by name, outside once resolved
    (root / "run.log").symlink_to(tmp_path / "outside" / "victim.log")
    for name in ("link/run", "run.log"):
        with pytest.raises(InputError, match="not to something inside the run root"):
            path_under_root(root, name)


def test_progress_is_read_from_the_analysis_bar_not_the_weight_loading_bar():
    log = ("Loading weights: 100%|##########| 398/398 [00:00<00:00]\n"
           "token evidence:  25%|##   | 1/4 [00:01<00:03]\rtoken evidence:  75%|###  | 3/4 [00:03<00:01]\r")
    assert progress_of(log) == (0.75, "token evidence", "token evidence:  75%|###  | 3/4 [00:03<00:01]")
    assert progress_of("Loading weights: 100%|##########| 398/398 [00:00<00:00]\n")[0] is None
    assert progress_of("no bar yet\n") == (None, "", "no bar yet")


def test_a_job_card_shows_its_own_progress_and_a_failed_job_no_bar():
    loaded = "Loading weights: 100%|##########| 398/398 [00:00<00:00]\n"
    running = job_status(None, loaded)
    assert running.fraction is None and running.label.startswith("starting")
    assert job_status(None, loaded + "layer similarity:  50%|#  | 2/4\r").fraction == 0.5
    failed = job_status(2, loaded + "error: no images in folder x\n")
    assert failed.fraction is None and failed.label == "failed (exit 2)"
    assert failed.last_line == "error: no images in folder x"
    assert job_status(0, loaded).fraction == 1.0


def test_a_job_appends_to_its_log_and_reads_only_its_own_part(tmp_path):
    import sys

    out = tmp_path / "similarity.v2"
    log = log_path(out)
    assert log == tmp_path / "similarity.v2.log"  # not with_suffix, which would write similarity.log
    log.write_text("earlier run: layer similarity: 100%|##| 4/4\n")
    code = "import sys; sys.stderr.write('work:  50%|#  | 1/2\\r'); sys.stderr.flush()"
    job = start_job([sys.executable, "-c", code], log, out)
    assert job.process.wait(timeout=60) == 0 and not job.running
    assert log.read_text().startswith("earlier run:")  # never truncated
    assert progress_of(job.log_text())[0] == 0.5  # not the earlier run's 100%


# --- computations on the default model -------------------------------------------------------

@pytest.fixture(scope="module")
def rule(default_model, tmp_path_factory):
    """The app's rule for the default model when none is shipped: a tokens run into the cache folder
    (on two probe scenes instead of the six sample photos, to keep the suite fast)."""
    from analyses.tokens import TokenRule
    from workbench.data import image_sets

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WB_CACHE_DIR", str(cache))
        patch.setattr("workbench.models.default_model.DEFAULT_WEIGHTS_DIR", cache / "no-weights")
        real = image_sets.resolve_image_set
        patch.setattr(image_sets, "resolve_image_set", lambda source: real("probe:val:2"))
        made = state.get_rule(default_model, "test-fallback")
        folder = state.rule_folder(default_model)
    assert isinstance(made.rule, TokenRule) and made.source.startswith("a tokens run over the sample photos")
    assert json.loads((folder / "summary.json").read_text())["rule"] == made.rule.to_dict()
    assert folder.is_relative_to(cache) and state.model_key(default_model) in str(folder)
    return made.rule


def test_a_shipped_rule_file_is_used_for_the_default_model(default_model, rule, tmp_path, monkeypatch):
    shipped = dict(rule.to_dict(), z_threshold=9.5)
    (tmp_path / state.RULE_FILE).write_text(json.dumps(shipped))
    monkeypatch.setattr("workbench.models.default_model.DEFAULT_WEIGHTS_DIR", tmp_path)
    shipped_rule = state.get_rule(default_model, "test-shipped")
    assert shipped_rule.rule.z_threshold == 9.5 and shipped_rule.source == SHIPPED_RULE
    assert shipped_rule.caption.startswith(f"labels by {SHIPPED_RULE} ({rule.kind}, {len(rule.anchors)} anchor")


def test_explain_image_categorises_every_patch_and_reads_the_logit_lens(default_model, rule):
    from workbench.data.images import load_image

    image = load_image("probe:test:0")
    report = explain_image(default_model, rule, image, "What colour is the star?", probe_item("test", 0),
                           max_new_tokens=4)
    assert (report.rows, report.cols) == (16, 16) and len(report.tokens) == 256
    assert set(report.tokens["category"]) <= {"sink", "dead", "alive"} and report.tokens["reason"].str.len().min() > 0
    assert report.tokens["patch_kind"].notna().all()  # ground truth of a probe scene
    assert report.view.size == (224, 224) and report.hidden.shape == (LAYERS, 256, 576)
    assert sum(report.fractions().values()) == pytest.approx(1.0)
    lens = logit_lens(default_model, report.hidden[:, 0])
    assert list(lens["layer"]) == list(range(LAYERS)) and all(len(t) == 5 for t in lens["top_tokens"])
    assert lens["norm"].iloc[5] == pytest.approx(float(report.hidden[5, 0].norm()), rel=1e-4)
    # The last layer's logit lens is the model's own next-token distribution for that position.
    assert all(0 < p <= 1 for p in lens["top_probs"].iloc[-1])


def test_the_fingerprint_changes_with_the_projector_weights(default_model):
    before = model_fingerprint(default_model)
    weight = next(default_model.adapter.projector.parameters())
    original = weight[0, 0].clone()
    with torch.no_grad():
        weight[0, 0] = original + 1.0
        try:
            assert model_fingerprint(default_model) != before
        finally:
            weight[0, 0] = original  # exactly: the session's model is shared
    assert model_fingerprint(default_model) == before


# --- the app, page by page (AppTest) -----------------------------------------------------------

@pytest.fixture
def app(default_model, rule, runs, monkeypatch):
    """The app on the default model (the session's), the test rule, and the synthetic runs as run root."""
    from streamlit.testing.v1 import AppTest

    from workbench.models import loading

    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda name, **kw: default_model if name == "default" else real(name, **kw))
    monkeypatch.setattr(state, "get_rule", lambda loaded, key: state.LabelRule(rule, "the test rule"))
    monkeypatch.setenv("WB_RUNS_DIR", str(runs["tokens"].parent))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def _texts(at) -> str:
    return "\n".join(element.value for element in [*at.markdown, *at.caption] if isinstance(element.value, str))


def _frame_with(at, column: str) -> pd.DataFrame:
    return next(frame.value for frame in at.dataframe if column in frame.value.columns)


def _decode(value):
    """Plotly's JSON with its base64 typed arrays ({"dtype", "bdata", "shape"}) turned back into lists."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        if shape:
            array = array.reshape([int(n) for n in str(shape).split(",")])
        return array.tolist()
    if isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def _plotly_specs(at) -> list[dict]:
    return [_decode(json.loads(element.proto.spec)) for element in at.get("plotly_chart")]


def test_explorer_shows_the_answer_the_overlay_and_the_selected_token(app, rule):
    at = app.run()
    assert not at.exception and not at.error
    assert any(text.startswith("**Answer:**") for text in (m.value for m in at.markdown))
    assert [metric.label for metric in at.metric] == ["sink", "dead", "alive"]
    assert f"labels by the test rule ({rule.kind}, " in _texts(at)  # which rule made the shares
    overlay = _plotly_specs(at)[0]
    assert overlay["data"][0]["type"] == "image" and sum(len(t.get("x", [])) for t in overlay["data"][1:]) == 256
    # Selecting a patch (what a click does) changes the details and the frame.
    at.number_input(key="token_row").set_value(3)
    at.number_input(key="token_col").set_value(5).run()
    assert "Token 53 · row 3, col 5" in _texts(at)
    frame = _plotly_specs(at)[0]["layout"]["shapes"][0]
    assert (frame["x0"], frame["y0"]) == (4.5, 2.5)
    # The layer slider moves the logit lens; the colour choice changes the overlay.
    at.slider(key="lens_layer").set_value(7).run()
    assert "Logit lens after layer 7" in _texts(at)
    at.selectbox(key="colour_by").set_value("input_norm").run()
    assert _plotly_specs(at)[0]["data"][1]["marker"]["colorscale"]
    assert not at.exception


def test_explorer_probe_scene_shows_ground_truth(app):
    at = app.run()
    at.radio(key="source").set_value("probe scene").run()
    at.number_input(key="probe_index").set_value(2).run()
    assert not at.exception and not at.error
    assert "ground truth:" in json.dumps(_plotly_specs(at)[0]["data"][1:])


@pytest.mark.parametrize("name", ["notes.txt", "broken.png", "dot.png"])
def test_bad_uploads_show_an_error_and_the_app_keeps_running(app, name):
    at = app.run()
    at.radio(key="source").set_value("upload").run()
    data, expected = BAD_UPLOADS[name]
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream")).run()
    assert not at.exception
    assert len(at.error) == 1 and expected in at.error[0].value and not at.get("plotly_chart")
    at.radio(key="source").set_value("sample photo").run()
    assert not at.exception and not at.error and at.get("plotly_chart")


def test_a_good_upload_is_explored(app):
    at = app.run()
    at.radio(key="source").set_value("upload").run()
    at.file_uploader(key="upload").set_value(("red.png", png_bytes((60, 40)), "image/png")).run()
    assert not at.exception and not at.error and len(_plotly_specs(at)[0]["data"]) > 1


def test_a_model_that_cannot_load_shows_its_reason_and_the_app_keeps_working(app):
    at = app.run()
    at.sidebar.text_input(key=state.MODEL_KEY).set_value("nobody/no-such-model").run()
    assert not at.exception
    errors = [error.value for error in at.sidebar.error]
    assert len(errors) == 1 and errors[0].startswith("cannot load model 'nobody/no-such-model'") and "\n" not in errors[0]
    assert at.get("plotly_chart")  # the explorer goes on with the model that loaded
    at.switch_page("runs_page.py").run()
    assert not at.exception and "Runs" in [title.value for title in at.title]


def test_without_any_model_the_pages_say_so_and_the_run_pages_work(app, monkeypatch, runs):
    monkeypatch.setenv("WB_APP_MODEL", "./no/such/folder")
    at = app.run()
    assert not at.exception and "no such folder" in at.sidebar.error[0].value
    assert "No model is loaded" in at.warning[0].value and not at.get("plotly_chart")
    at.switch_page("export_page.py").run()
    at.selectbox(key="export_run").set_value(str(runs["similarity"]))
    at.selectbox(key="export_method").set_value("injection").run()
    assert not at.exception and "inject_layer: 4" in at.code[0].value
    assert "the default model's shapes" in _texts(at)


def test_layers_page_draws_the_curves_with_the_recommended_layers_and_attention(app, runs):
    at = app.run()
    at.switch_page("layers_page.py").run()
    assert not at.exception and "Layers" in [title.value for title in at.title]
    # The newest run of each kind is shown first; the synthetic root has one of each.
    assert at.selectbox(key="layers_similarity").value == str(runs["similarity"])
    similarity, alignment, heatmap, share = _plotly_specs(at)
    marks = [a["text"] for a in similarity["layout"]["annotations"]]
    assert marks == ["inject 4", "exit 14"] and len(similarity["data"]) == 3
    assert [a["text"] for a in alignment["layout"]["annotations"]] == ["inject 29"]
    assert "**29**" in _texts(at)
    recommendation = _frame_with(at, "recommendation")
    assert list(recommendation["layer"][:2]) == ["4", "14"]
    received = np.array(heatmap["data"][0]["z"])
    assert heatmap["data"][0]["type"] == "heatmap" and received.shape == (LAYERS, 256)
    assert heatmap["data"][0]["colorscale"] == SEQUENTIAL  # explicit: the theme cannot swap its colours
    assert np.allclose(share["data"][0]["y"], received.sum(1), atol=1e-4) and (received >= 0).all()
    at.selectbox(key="layers_similarity").select_index(0)  # "(none)"
    at.selectbox(key="layers_alignment").select_index(0).run()
    assert len(at.get("plotly_chart")) == 2 and "choose a similarity or alignment run" in at.info[0].value


def test_runs_page_shows_each_kind_and_compares_two_runs(app, runs):
    at = app.run()
    at.switch_page("runs_page.py").run()
    at.selectbox(key="run_a").set_value(str(runs["interventions"])).run()
    assert not at.exception
    table = _frame_with(at, "condition")
    assert list(table["condition"]) == ["all tokens", "remove dead"]
    at.selectbox(key="run_a").set_value(str(runs["tokens"]))
    at.selectbox(key="run_b").set_value(str(runs["tokens2"])).run()
    comparison = _frame_with(at, "measure").set_index("measure")
    assert comparison.loc["fraction dead", "B - A"] == pytest.approx(0.21)
    assert len(at.get("plotly_chart")) == 2  # one fractions chart per run
    assert "labels by this run's own rule, made on its 4 images of `probe:4` (embedlens, 1 anchor)" in _texts(at)
    at.selectbox(key="run_a").set_value(str(runs["probe"])).run()
    assert not at.exception and "VQA accuracy" in _texts(at)


@pytest.mark.parametrize("name", ["../../etc", "/etc/x", "a/../../b"])
def test_the_job_launcher_refuses_a_name_outside_the_run_root(app, tmp_path, monkeypatch, name):
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    monkeypatch.setenv("WB_RUNS_DIR", str(root))
    at = app.run()
    at.switch_page("runs_page.py").run()
    at.text_input(key="job_name").set_value(name).run()
    assert not at.exception and len(at.error) == 1 and "\n" not in at.error[0].value
    assert at.button(key="job_start").disabled and not at.session_state["jobs"]
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["deep", "root"]  # nothing made, in or out


def test_the_job_launcher_writes_under_the_run_root_and_appends_to_the_log(app, tmp_path, monkeypatch):
    import sys

    root = tmp_path / "root"
    monkeypatch.setenv("WB_RUNS_DIR", str(root))
    monkeypatch.setattr("apps.jobs.analyze_command", lambda kind, model, images, out: [
        sys.executable, "-c", f"print('analysis {kind} into {out}')"])
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "tokens-a.log").write_text("the first attempt\n")
    at = app.run()
    at.switch_page("runs_page.py").run()
    at.text_input(key="job_name").set_value("mine/tokens-a").run()
    assert not at.error and f"writes `{root / 'mine' / 'tokens-a'}`" in _texts(at)
    at.button(key="job_start").click().run()
    (job,) = at.session_state["jobs"]
    assert job.process.wait(timeout=60) == 0 and job.log == root / "mine" / "tokens-a.log"
    assert job.log.read_text() == f"the first attempt\nanalysis tokens into {root / 'mine' / 'tokens-a'}\n"
    at.run()
    assert "**finished**" in _texts(at)


def test_runs_page_refuses_a_folder_that_is_not_a_run(app, tmp_path):
    at = app.run()
    at.switch_page("runs_page.py").run()
    at.selectbox(key="run_a").set_value("(type a folder path)").run()
    at.text_input(key="run_a_path").set_value(str(tmp_path)).run()
    assert not at.exception and "is not a run folder" in at.error[0].value


def test_export_page_prefills_validates_estimates_and_saves(app, runs, tmp_path):
    at = app.run()
    at.switch_page("export_page.py").run()
    at.selectbox(key="export_run").set_value(str(runs["similarity"]))
    at.selectbox(key="export_method").set_value("hidrop").run()
    assert not at.exception and not at.error
    assert "exit_layer: 14" in at.code[0].value and "inject_layer: 4" in at.code[0].value
    saving = float(at.metric[1].value.rstrip("%"))
    assert 30 < saving < 100
    # An invalid edit is reported inline and no YAML is offered.
    key = next(widget.key for widget in at.number_input if widget.key and widget.key.endswith("_exit_layer"))
    at.number_input(key=key).set_value(3).run()
    assert "must come after inject_layer" in at.error[0].value and not at.code
    at.number_input(key=key).set_value(20).run()
    assert not at.error and "exit_layer: 20" in at.code[0].value
    assert float(at.metric[1].value.rstrip("%")) < saving  # later exit, more tokens, smaller saving
    # Saved under the run root; an existing file is replaced only once "overwrite" is ticked.
    target = runs["tokens"].parent / "configs" / "hidrop-saved.yaml"
    at.text_input(key="save_path").set_value("configs/hidrop-saved.yaml")
    at.button(key="save").click().run()
    assert not at.error and load_config(target).exit_layer == 20
    at.number_input(key=key).set_value(21).run()
    at.button(key="save").click().run()
    assert at.error[0].value == f"{target} exists: tick 'overwrite' to replace it"
    assert load_config(target).exit_layer == 20
    next(box for box in at.checkbox if box.label.startswith("overwrite")).check().run()
    at.button(key="save").click().run()
    assert not at.error and load_config(target).exit_layer == 21
    at.run()
    assert not next(box for box in at.checkbox if box.label.startswith("overwrite")).value  # asks again
    # A name that leaves the run root is refused in one line, and nothing is written.
    for name, outside in (("../escaped.yaml", runs["tokens"].parent.parent / "escaped.yaml"),
                          (str(tmp_path / "absolute.yaml"), tmp_path / "absolute.yaml")):
        at.text_input(key="save_path").set_value(name).run()
        assert len(at.error) == 1 and "run root" in at.error[0].value and "\n" not in at.error[0].value
        assert not outside.exists()
    # A method the run cannot give says which run it needs.
    at.selectbox(key="export_method").set_value("prune").run()
    assert "no token categories" in at.error[0].value


def test_the_apps_rule_cache_never_deletes_a_folder_another_session_is_writing(tmp_path, monkeypatch):
    """A lock refusal is a `FolderInUse`, which the rule cache passes on instead of starting the folder over."""
    from apps import state
    from workbench.errors import FolderInUse
    from workbench.files import RunFolderLock

    folder = tmp_path / "rule-run"
    folder.mkdir()
    monkeypatch.setattr(state, "rule_folder", lambda loaded: folder)
    loaded = type("Loaded", (), {"name": "not-the-default"})()
    with RunFolderLock(folder), pytest.raises(FolderInUse):
        state.get_rule.__wrapped__(loaded, "key")
    assert folder.is_dir()
