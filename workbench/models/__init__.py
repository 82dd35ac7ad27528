"""Models: loading, architecture adapters for each supported family, the embedded default model."""

# Importing a family registers its adapter.
from workbench.models import gemma3, idefics3, llava, llava_next, llava_onevision, qwen2_vl  # noqa: F401
