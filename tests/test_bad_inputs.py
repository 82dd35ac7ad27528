"""Bad inputs through the command line, as a hostile user gives them: each ends in one `error:` line on stderr,
exit code 2 and no traceback. Cases marked `before load` must be refused before any model loads.

The table holds what a hostile-user pass found (output paths that are files or folders, runaway
probe sets and prompts, bytes that are not UTF-8, a garbage model config, a negative answer length)
and the cases that already passed, so that they stay passing.
"""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny_models import tiny_llava

LONG_PROMPT = "describe " * 11_000  # about 11,000 tokens; the default model's context is 8,192


def _written(tmp_path, name: str, content: str | bytes):
    """A file named `name` in `tmp_path` holding `content`."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _file(tmp_path):
    return _written(tmp_path, "a-file", "not a folder")


def _invalid_config(tmp_path):
    return _written(tmp_path, "invalid.yaml", "method: fastv\nnum_llm_layers: 30\nkeep: 7\n")


def _folder(tmp_path):
    path = tmp_path / "a-folder"
    path.mkdir(exist_ok=True)
    return path


def _garbage_model(tmp_path):
    path = tmp_path / "garbage-model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text("{not json")
    return path


def _text_only_model(tmp_path):
    path = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(path)
    return path


def _imageless_model(tmp_path):
    path = tmp_path / "imageless"
    model = tiny_llava(num_layers=1)
    model.config.image_token_id = 500  # beyond the vocabulary: no image token
    model.config.save_pretrained(path)
    return path


# (id, args built from tmp_path, a phrase the error line must contain, refused before any model loads)
CASES = [
    # Found by the hostile-user pass.
    ("analyze-out-is-a-file", lambda t: ["analyze", "tokens", "--images", "probe:2", "--out", _file(t)],
     "is a file", True),
    ("train-default-out-is-a-file", lambda t: ["train", "default", "--smoke", "--out", _file(t)], "is a file", True),
    ("train-hidrop-out-is-a-file", lambda t: ["train", "hidrop", "--config", _invalid_config(t), "--out", _file(t)],
     "is a file", True),
    ("data-out-is-a-file", lambda t: ["data", "probe-scenes", "--n", "1", "--out", _file(t)], "is a file", True),
    ("bench-out-is-a-file", lambda t: ["bench", "--variants", "dense", "--out", _file(t)], "is a file", True),
    ("out-under-a-file", lambda t: ["analyze", "tokens", "--images", "probe:2", "--out", _file(t) / "run"],
     "is a file, so no folder", True),
    ("export-out-is-a-folder", lambda t: ["export-config", "--run", _folder(t), "--method", "hidrop", "--out",
                                          _folder(t)], "is a folder", True),
    ("probe-set-beyond-the-split", lambda t: ["analyze", "tokens", "--images", "probe:test:999999999", "--out",
                                              t / "run"], "more scenes than the split has", True),
    ("inspect-probe-beyond-the-split", lambda t: ["inspect", "probe:test:999999999"], "does not exist", True),
    ("prompt-not-utf8", lambda t: ["inspect", "sample:astronaut", "--prompt", "caf\udce9"], "not valid UTF-8", True),
    ("max-new-tokens-negative", lambda t: ["inspect", "sample:astronaut", "--max-new-tokens", "-1"], None, True),
    ("garbage-model-config", lambda t: ["inspect", "sample:astronaut", "--model", _garbage_model(t)],
     "config.json cannot be read", False),
    ("bench-no-variants", lambda t: ["bench", "--variants", ""], "no variants given", True),
    # Already passing: they stay so.
    ("missing-image", lambda t: ["inspect", t / "nope.png"], "image not found", True),
    ("corrupt-image", lambda t: ["inspect", _written(t, "corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)],
     "cannot read image", True),
    ("unknown-sample", lambda t: ["inspect", "sample:nope"], "unknown sample", True),
    ("wrong-model-id", lambda t: ["inspect", "sample:astronaut", "--model", "./no/such/model"], "no such folder",
     False),
    ("text-only-model", lambda t: ["inspect", "sample:astronaut", "--model", _text_only_model(t)],
     "unsupported architecture", False),
    ("model-without-image-token", lambda t: ["inspect", "sample:astronaut", "--model", _imageless_model(t)],
     "has no image token", False),
    ("unknown-variant", lambda t: ["bench", "--variants", "dense,nope"], "unknown variant", True),
    ("bad-probe-set", lambda t: ["analyze", "tokens", "--images", "probe:lots", "--out", t / "run"],
     "bad image set", True),
    ("missing-image-folder", lambda t: ["analyze", "tokens", "--images", t / "nowhere", "--out", t / "run"],
     "", True),
    ("bad-layer-list", lambda t: ["analyze", "interventions", "--images", "probe:2", "--out", t / "run",
                                  "--exit-layers", "a-b"], "bad list", True),
    ("embedlens-without-anchors", lambda t: ["analyze", "tokens", "--images", "probe:2", "--out", t / "run",
                                             "--rule", "embedlens"], "needs anchor ids", True),
    ("malformed-config-yaml", lambda t: ["bench", "--variants", "dense,fastv", "--config",
                                          _written(t, "bad.yaml", "method: hidrop\nnum_llm_layers: [oops\n")],
     "", True),
    ("invalid-config", lambda t: ["bench", "--variants", "dense,fastv", "--config", _invalid_config(t)], "keep",
     True),
    ("export-from-a-missing-run", lambda t: ["export-config", "--run", t / "nope", "--method", "hidrop", "--out",
                                             t / "x.yaml"], "", True),
    ("eval-weights-not-a-run", lambda t: ["eval", "vqa", "--n", "1", "--weights", _folder(t)],
     "holds no trained projector", False),
    ("eval-weights-for-another-model", lambda t: ["eval", "vqa", "--n", "1", "--model", _garbage_model(t),
                                                  "--weights", _folder(t)], "default model only", False),
    ("unfinished-tokens-run", lambda t: ["analyze", "probe", "--images", "probe:2", "--out", t / "probe",
                                         "--tokens-run", t / "tokens-run"], "not a run folder", True),
]


@pytest.mark.parametrize("make_args, phrase, before_load", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_error_line(run_wb, capsys, tmp_path, monkeypatch, make_args, phrase, before_load):
    if before_load:
        monkeypatch.setattr("workbench.models.loading.load_model",
                            lambda *args, **kwargs: pytest.fail("a model loaded before the bad input was refused"))
    args = [str(arg) for arg in make_args(tmp_path)]
    capsys.readouterr()  # what building the case printed (e.g. saving a model) is not the command's
    code, out, err = run_wb(*args)
    assert code == 2 and "Traceback" not in err
    if phrase is None:  # a value the option's range refuses: the parser's own usage message
        assert "Invalid value" in err
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], err


def test_a_prompt_longer_than_the_context_is_refused_before_the_forward_pass(run_wb, default_model, monkeypatch):
    monkeypatch.setattr("workbench.inspection.capture", lambda *a, **k: pytest.fail("the forward pass ran"))
    code, _, err = run_wb("inspect", "sample:astronaut", "--prompt", LONG_PROMPT, model=default_model)
    assert code == 2 and err.count("\n") == 1
    assert "the model's context is 8,192 tokens" in err and "and 40 answer tokens" in err


def test_every_case_is_named_once():
    names = [case[0] for case in CASES]
    assert len(names) == len(set(names)) and len(names) >= 25


def test_an_os_error_deep_in_a_command_is_one_line(run_wb, monkeypatch, tmp_path):
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "scenes.jsonl"))
    monkeypatch.setattr("workbench.data.probe_scenes.write_probe_scenes", unwritable)
    code, _, err = run_wb("data", "probe-scenes", "--n", "1", "--out", str(tmp_path))
    assert code == 2 and err.strip() == (f"error: {tmp_path / 'scenes.jsonl'}: Permission denied; check the path and "
                                         "its permissions")


def test_a_16_bit_png_reaches_the_model_scaled(tmp_path):
    """The whitening case: what `wb inspect` would feed the processor is the scaled image."""
    import numpy as np

    from workbench.data.images import load_image

    Image.fromarray(np.full((32, 32), 16384, dtype=np.uint16)).save(tmp_path / "dark16.png")
    assert np.asarray(load_image(tmp_path / "dark16.png")).mean() == pytest.approx(64, abs=1)


def test_the_app_refuses_a_prompt_longer_than_the_context(default_model, monkeypatch):
    from analyses.tokens import TokenRule
    from apps.compute import attention_by_layer, explain_image
    from workbench.data.image_sets import ImageItem
    from workbench.errors import InputError

    monkeypatch.setattr("apps.compute.capture", lambda *a, **k: pytest.fail("the forward pass ran"))
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match="the model's context is 8,192 tokens"):
        explain_image(default_model, TokenRule("embedlens", 3, []), image, LONG_PROMPT, ImageItem("x", lambda: image))
    with pytest.raises(InputError, match="the model's context is 8,192 tokens"):
        attention_by_layer(default_model, image, LONG_PROMPT)  # the Layers page's attention heatmap
