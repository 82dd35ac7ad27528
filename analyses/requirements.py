"""What each `wb analyze` command needs of a model's architecture adapter, for README's support table.

Each entry names the adapter flags (`ArchitectureAdapter` class attributes) without which the analysis refuses
the model; an analysis that needs none traces any adapter's model. tests/test_support_table.py checks that
every `wb analyze` command is listed here.
"""

from __future__ import annotations

ANALYSIS_NEEDS: dict[str, tuple[str, ...]] = {
    "tokens": (),
    "probe": ("token_schedules",),  # its VQA keeps only alive tokens by a token schedule
    "alignment": (),
    "similarity": ("token_schedules",),  # the image's effect is measured against a schedule without visual tokens
    "vision-layers": ("tower_hidden_states",),
    "interventions": ("token_schedules",),  # removal, exit and injection are token schedules
    "vica-layers": ("token_schedules",),  # the cut runs on the engine's embeddings and position ids
    "routing": (),  # routes a SkipGPT run's text-only causal LM: no image, no adapter flag
    "report": (),  # reads finished runs only
}
