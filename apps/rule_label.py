"""Names the rule that labelled tokens sink / dead / alive, shown beside every category share.

The same photo can be 59% sink under one rule and 0% under another, both right for their own rule (the
`auto` rule's thresholds and sink directions are learnt from the images it was found on), so a share on
screen always says which rule made it.
"""

from __future__ import annotations

SHIPPED_RULE = "the shipped probe-scene rule"  # the default model's token_rule.json, found on probe scenes


def rule_caption(rule: dict, source: str) -> str:
    """'labels by SOURCE (KIND, N anchors)' for a rule in its saved form (`TokenRule.to_dict()`)."""
    anchors = len(rule.get("anchors", []))
    return f"labels by {source} ({rule.get('kind', '?')}, {anchors} anchor{'' if anchors == 1 else 's'})"


def run_rule_source(manifest: dict, summary: dict) -> str:
    """Where a tokens run's own rule came from: the run itself, over its images."""
    return f"this run's own rule, made on its {summary.get('num_images', '?')} images of `{manifest.get('data', '?')}`"
