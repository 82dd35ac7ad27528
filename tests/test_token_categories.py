"""Token categories: the reference rule on a hand-computed case, and the auto rule finding planted
dead and sink tokens in the default model; resumed runs give the same table; anchor ids per role.
(The reference's overlapping groups: tests/test_reference_parity_embedlens.py.)"""

import json
import shutil

import pandas as pd
import pytest
import torch

from analyses.tokens import Anchor, TokenRule, TokensConfig, analyze_tokens, given_anchors
from workbench.data.image_sets import resolve_image_set
from workbench.errors import InputError
from workbench.inspection import nearest_vocabulary

DEAD_TOKENS = list(range(32, 64))  # rows 2-3 of the 16 x 16 grid (the first token draws attention by position)
SINK_TOKEN = 137


def test_reference_rule_on_a_hand_computed_top_k():
    basis = torch.eye(6)
    vectors = torch.stack([3 * basis[1] + 2 * basis[3] + basis[0],  # top-3: 1, 3, 0
                           3 * basis[4] + 2 * basis[2] + basis[5],  # top-3: 4, 2, 5
                           3 * basis[5] + 2 * basis[0] + basis[2]])  # top-3: 5, 0, 2
    _, ids = nearest_vocabulary(vectors, basis, 3)
    assert ids.tolist() == [[1, 3, 0], [4, 2, 5], [5, 0, 2]]
    anchors = [Anchor(0, "a", "sink_vit", 0, 0, 0), Anchor(2, "b", "sink_llm", 0, 0, 0), Anchor(3, "c", "dead", 0, 0, 0)]
    evidence = pd.DataFrame({"topk_ids": ids.tolist()})
    decided = TokenRule("embedlens", 3, anchors).classify(evidence)
    # Token 0 has both the ViT-sink anchor (0) and the dead anchor (3): sink wins, as in the reference order.
    assert decided["category"].tolist() == ["sink", "sink", "sink"]
    assert decided["sink_source"].tolist() == ["vit", "llm", "vit"]
    top2 = TokenRule("embedlens", 2, anchors).classify(evidence)
    assert top2["category"].tolist() == ["dead", "sink", "sink"] and top2["sink_source"].tolist() == ["", "llm", "vit"]
    top1 = TokenRule("embedlens", 1, anchors).classify(evidence)
    assert top1["category"].tolist() == ["alive", "alive", "alive"]


@pytest.fixture
def planted(default_model):
    """The default model with its projector replaced: rows 2-3 map to one vocabulary embedding
    (dead), one token to a massive activation (sink), the rest to image-specific random directions."""
    embeddings = default_model.adapter.embed_tokens.weight.detach()
    dead_id = 1000
    # A massive activation: almost all of a huge norm in one hidden dimension.
    sink_vector = embeddings[2].clone()
    sink_vector[7] = 500 * embeddings.norm(dim=-1).mean()

    def hook(module, args, output):
        features = args[0]
        # A seed per patch content and position: alive tokens point in directions that differ across
        # images and positions (plain backgrounds give identical features at every patch).
        seeds = (features.abs().sum(-1) * 1e3).long() + torch.arange(features.shape[1]) * 7919
        planted = torch.stack([torch.stack([torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(int(seed)))
                                            for seed in row]) for row in seeds])
        planted *= embeddings.norm(dim=-1).mean() / planted.norm(dim=-1, keepdim=True)
        planted[:, DEAD_TOKENS] = embeddings[dead_id]
        planted[:, SINK_TOKEN] = sink_vector
        return planted.to(output.dtype)

    handle = default_model.adapter.projector.register_forward_hook(hook)
    yield default_model, dead_id
    handle.remove()


def test_auto_rule_finds_the_planted_dead_and_sink_tokens(planted, tmp_path):
    loaded, dead_id = planted
    summary = analyze_tokens(loaded, resolve_image_set("probe:test:3"), str(tmp_path / "run"),
                             TokensConfig(batch_size=3))
    table = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    anchors = {anchor["id"]: anchor for anchor in summary["rule"]["anchors"]}
    assert dead_id in anchors and anchors[dead_id]["role"] == "dead"
    assert anchors[dead_id]["coverage"] == 1.0 and anchors[dead_id]["consistency"] > 0.99
    dead = table[table["token"].isin(DEAD_TOKENS)]
    assert (dead["category"] == "dead").all()
    assert "anchor" in dead["reason"].iat[0]
    sinks = table[table["token"] == SINK_TOKEN]
    assert (sinks["category"] == "sink").all() and (sinks["sink_source"] == "llm").all()
    others = table[~table["token"].isin([*DEAD_TOKENS, SINK_TOKEN])]
    assert (others["category"] == "alive").mean() > 0.9
    # Under auto, a token's reference groups always hold its exclusive sink or dead category.
    assert table.loc[table["category"] == "sink", "in_sink"].all() and table.loc[sinks.index, "in_sink_llm"].all()
    assert table.loc[table["category"] == "dead", "in_dead"].all()
    assert (table["in_alive"] == ~(table["in_sink"] | table["in_dead"])).all()
    assert summary["group_fractions"]["dead"] >= summary["fractions"]["dead"]
    # The default model's only row past its base vocabulary is the image token, never a neighbour anyway.
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["excluded_vocabulary_rows"].startswith("49152 (")
    # Ground truth travels with each token for probe scenes.
    assert set(table["patch_kind"]) <= {"object", "text", "background"}


@pytest.mark.slow
def test_resuming_a_tokens_run_gives_the_same_table(default_model, tmp_path):
    images = resolve_image_set("probe:test:3")
    config = TokensConfig(batch_size=1)
    analyze_tokens(default_model, images, str(tmp_path / "run"), config)
    first = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    # Pretend the run died after its first batch.
    for path in [*(tmp_path / "run" / "parts").glob("evidence-0000[12]*"), tmp_path / "run" / "tokens.parquet"]:
        path.unlink()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest | {"status": "running"}))
    analyze_tokens(default_model, images, str(tmp_path / "run"), config)
    second = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    pd.testing.assert_frame_equal(first, second)
    shutil.rmtree(tmp_path / "run")


def test_the_reference_rule_needs_its_anchors_each_with_one_role():
    with pytest.raises(InputError, match="--sink-vit IDS, --sink-llm IDS and/or --dead IDS"):
        TokensConfig(rule="embedlens")
    with pytest.raises(InputError, match="anchor id 7 is given to two roles, --sink-llm and --dead"):
        TokensConfig(rule="embedlens", anchors={"sink_llm": (5, 7), "dead": (7,)})
    with pytest.raises(InputError, match="for --rule embedlens"):
        TokensConfig(anchors={"dead": (7,)})
    assert TokensConfig(rule="embedlens", anchors={"sink_llm": (26, 11)}).anchors == {"sink_llm": (26, 11)}


def test_anchor_ids_must_be_text_tokens_of_the_vocabulary(default_model):
    for token_id in (49152, 49153):  # the image token; past the matrix
        with pytest.raises(InputError, match=f"--dead {token_id} can never be a neighbour"):
            given_anchors(default_model, {"dead": (token_id,)})
    anchors = given_anchors(default_model, {"sink_llm": (4367, 141), "dead": (4763,)})
    assert [(anchor.id, anchor.role) for anchor in anchors] == [(4367, "sink_llm"), (141, "sink_llm"), (4763, "dead")]


def test_embedlens_cli_takes_several_ids_per_role_and_prints_both_fractions(run_wb, default_model, tmp_path):
    code, _, err = run_wb("analyze", "tokens", "--images", "probe:test:1", "--out", str(tmp_path / "bad"),
                          "--rule", "embedlens", "--sink-llm", "5", "--dead", "5,6")
    assert code == 2 and "given to two roles" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_wb("analyze", "tokens", "--images", "probe:test:2", "--out", str(tmp_path / "run"),
                            "--rule", "embedlens", "--sink-llm", "4367,141", "--dead", "4763", model=default_model)
    assert code == 0, err
    assert "exclusive" in out and "reference groups" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [anchor["role"] for anchor in summary["rule"]["anchors"]] == ["sink_llm", "sink_llm", "dead"]
    table = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    near = table["topk_ids"].apply(lambda ids: bool({4367, 141} & set(ids)))
    assert (table["in_sink_llm"] == near).all() and (table["in_sink"] == near).all()
