"""Every shipped YAML config (the demo's pipeline.yaml and the real-target examples) loads and names only
options that exist, so a user copying one never meets 'unknown key' on a cluster."""
from pathlib import Path

import click
import pytest

from stages.cli import COMMANDS, main
from stages.config import check_section, load_pipeline_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "pipeline.yaml", *sorted((ROOT / "examples").rglob("*.yaml"))]


def test_the_demo_config_ships():
    assert (ROOT / "pipeline.yaml").is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_names_only_real_options(path):
    sections = load_pipeline_file(path)
    assert sections, f"{path} is empty"
    ctx = click.Context(main)
    for section, values in sections.items():
        assert section in COMMANDS, f"{path}: unknown section {section}"
        check_section(path, section, values, main.get_command(ctx, section))
