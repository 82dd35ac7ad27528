"""README's support table is the one the registries declare, and it follows a changed declaration."""

import dataclasses
from pathlib import Path

import pytest

from analyses.analyze_commands import analyze_app
from analyses.requirements import ANALYSIS_NEEDS
from efficient_models import registry
from wb.support_table import END, START, readme_table, render_table, rewrite_readme
from workbench.errors import InputError
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.llava import LlavaAdapter
from workbench.models.qwen2_vl import Qwen2VLAdapter

README = Path(__file__).resolve().parents[1] / "README.md"


def row(table: str, model_type: str) -> list[str]:
    line = next(line for line in table.splitlines() if f"(`{model_type}`) |" in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_readme_holds_the_generated_table():
    assert readme_table(README) == render_table(), "README's support table is stale: run " \
                                                   "`wb support-table --readme README.md`"


def test_the_table_follows_an_adapters_capability_flags(monkeypatch):
    before = render_table()
    assert row(before, "qwen2_vl")[1:7] == ["yes", "all but vision-layers", "yes", "yes", "yes", "no"]

    monkeypatch.setattr(Qwen2VLAdapter, "token_schedules", False)
    # ViCA's decoder is built on the token-schedule engine, so it follows the same flag.
    assert row(render_table(), "qwen2_vl")[2:6] == [
        "all but probe, similarity, vision-layers, interventions, vica-layers", "yes", "no", "no"]
    monkeypatch.setattr(LlavaAdapter, "tower_hidden_states", False)
    assert row(render_table(), "llava")[2] == "all but vision-layers"
    assert render_table() != before


def test_method_columns_read_the_registry(monkeypatch):
    fusion = registry.method("fusion")
    monkeypatch.setitem(registry._METHODS, "fusion", dataclasses.replace(fusion, runs_on=lambda adapter: True))
    assert row(render_table(), "qwen2_vl")[6] == "yes"

    monkeypatch.setitem(registry._METHODS, "fusion", dataclasses.replace(fusion, runs_on=None))
    with pytest.raises(ValueError, match="'fusion' has a model but does not declare"):
        render_table()

    monkeypatch.delitem(registry._METHODS, "fusion")
    assert row(render_table(), "llava")[6] == "not built"


def test_every_analysis_declares_what_it_needs_of_an_adapter():
    commands = {command.name for command in analyze_app.registered_commands}
    assert set(ANALYSIS_NEEDS) == commands
    flags = {flag for needs in ANALYSIS_NEEDS.values() for flag in needs}
    assert all(isinstance(getattr(ArchitectureAdapter, flag), bool) for flag in flags)


def test_the_command_rewrites_only_the_marked_region(tmp_path, run_wb):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nprose\n\n{START}\nold table\n{END}\n\nmore prose\n", encoding="utf-8")

    code, out, _ = run_wb("support-table", "--readme", str(readme))
    assert (code, out.strip()) == (0, f"{readme}: support table rewritten")
    assert readme.read_text(encoding="utf-8") == f"# title\n\nprose\n\n{START}\n{render_table()}\n{END}\n\nmore prose\n"
    assert not rewrite_readme(readme)

    code, out, _ = run_wb("support-table")
    assert (code, out.strip()) == (0, render_table())


def test_a_file_without_markers_is_refused_in_one_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n", encoding="utf-8")
    with pytest.raises(InputError, match="no <!-- support-table:start --> ... <!-- support-table:end --> markers"):
        rewrite_readme(readme)
