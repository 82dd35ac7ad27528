"""Models: loading, architecture adapters for each supported family, the embedded default model."""

from workbench.models import llava, qwen2_vl  # noqa: F401  (importing a family registers its adapter)
