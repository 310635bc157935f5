"""The CLI table and pipeline.yaml handling."""
from click.testing import CliRunner

from stages.cli import COMMANDS, main


def test_help_lists_every_stage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_unknown_config_section_is_rejected(tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("trian:\n  lr: 1.0\n")
    result = CliRunner().invoke(main, ["--config", str(cfg), "verify", "--help"])
    assert result.exit_code == 2
    assert "unknown section 'trian'" in result.output


def test_missing_config_file_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.yaml"), "verify", "--help"])
    assert result.exit_code == 2
    assert "config file not found" in result.output
