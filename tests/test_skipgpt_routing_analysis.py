"""`wb analyze routing` on a SkipGPT run folder made around a tiny random Llama: counts, summary, resume."""

import pandas as pd
import pytest
import yaml
from transformers import AutoModelForCausalLM

from analyses.routing import summarise
from efficient_models.skipgpt.config import SkipGPTConfig
from efficient_models.skipgpt.routed_lm import RoutedLM
from efficient_models.skipgpt.training import DEFAULT_RECIPE, save_routers
from tests.test_skipgpt_routing import scrambled
from tests.test_skipgpt_training import tiny_folder  # noqa: F401 (a fixture)
from workbench.configs import config_yaml


@pytest.fixture
def routers_run(tmp_path, tiny_folder):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_yaml(SkipGPTConfig(model=str(tiny_folder), sparsity=0.5)))
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text()) | {"block_size": 16}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    routed = scrambled(RoutedLM(AutoModelForCausalLM.from_pretrained(tiny_folder)))
    save_routers(run / "routers.safetensors", routed)
    return run


def test_routing_counts_and_summary(tmp_path, run_wb, routers_run):
    out = tmp_path / "routing"
    code, stdout, stderr = run_wb("analyze", "routing", "--run", str(routers_run), "--out", str(out), "--blocks", "5",
                                  "--batch-size", "2", "--position-bins", "4")
    assert code == 0, stdout + stderr
    table = pd.read_parquet(out / "routing.parquet")
    assert len(table) == 2 * 2 * 16  # layers x modules x positions
    assert (table["tokens"] == 5).all() and (table["ran"] <= table["tokens"]).all()
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert 0 < summary["modules_skipped"] < 1
    assert len(summary["attention_skipped_by_layer"]) == 2 and len(summary["mlp_skipped_by_position"]) == 4
    attention = table[table["module"] == "attention"]
    assert summary["attention_skipped"] == pytest.approx(1 - attention["ran"].sum() / attention["tokens"].sum(),
                                                         abs=1e-4)
    assert len(list((out / "parts").glob("routing-*.done"))) == 3
    # the same command resumes a finished run from its parts
    code, again, _ = run_wb("analyze", "routing", "--run", str(routers_run), "--out", str(out), "--blocks", "5",
                            "--batch-size", "2", "--position-bins", "4")
    assert code == 0 and "attention skipped" in again


def test_the_summary_reads_trends_by_position():
    rows = []
    for position in range(4):
        late = position >= 2
        rows.append({"layer": 0, "module": "attention", "position": position, "tokens": 10, "ran": 9 if late else 5})
        rows.append({"layer": 0, "module": "mlp", "position": position, "tokens": 10, "ran": 6 if late else 8})
    summary = summarise(pd.DataFrame(rows), position_bins=2, block_size=4)
    assert summary["attention_skipped"] == pytest.approx(0.3) and summary["mlp_skipped"] == pytest.approx(0.3)
    assert summary["attention_skipped_by_position"] == [0.5, 0.1]
    assert summary["later_tokens_skip_less_attention"] and summary["later_tokens_skip_more_mlp"]
    assert not summary["attention_more_redundant_than_mlp"]
