"""stages/options.py: a settings dataclass generates its click options (types, defaults, choices, flags,
repeatable and required options, help from the attribute docstrings), and the stages' commands are built so."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from stages.options import click_options, field_docs, option


@dataclass(frozen=True)
class Example:
    out: str = option(type=click.Path(file_okay=False))
    """Where to write. Several sentences
    over two lines are one paragraph."""
    steps: int = 3
    """Steps to run (see `rate`)."""
    rate: float | None = None
    """Optional rate."""
    mode: Literal["fast", "exact"] = "exact"
    """How to run."""
    resume: bool = False
    """Continue."""
    compile: bool = True
    """Compile the step."""
    init_head: bool = option(False, negatable=True)
    """Start the head from the target's."""
    data: tuple[str, ...] = ()
    """Input files; repeatable."""
    layers: int = option(1, type=click.IntRange(min=1))
    """At least one."""
    secret: int = option(0, hidden=True)
    """Not shown."""


@click.command()
@click_options(Example)
def example(**kwargs):
    click.echo(repr(Example(**kwargs)))


def params() -> dict[str, click.Option]:
    return {p.name: p for p in example.params}


def test_one_option_per_field_in_field_order_with_the_dataclass_defaults():
    assert list(params()) == [f.name for f in dataclasses.fields(Example)]
    ctx = example.make_context("example", ["--out", "o"])
    assert Example(**ctx.params) == Example(out="o")


def test_types_choices_flags_multiple_and_required():
    p = params()
    assert p["out"].required and isinstance(p["out"].type, click.Path)
    assert not any(p[name].required for name in p if name != "out")
    assert p["steps"].type is click.INT and p["rate"].type is click.FLOAT and p["rate"].default is None
    assert p["mode"].type.choices == ("fast", "exact")
    assert p["resume"].is_flag and p["resume"].opts == ["--resume"] and not p["resume"].secondary_opts
    assert p["compile"].secondary_opts == ["--no-compile"] and p["compile"].default is True
    assert p["init_head"].opts == ["--init-head"] and p["init_head"].secondary_opts == ["--no-init-head"]
    assert p["data"].multiple and p["data"].default == ()
    assert isinstance(p["layers"].type, click.IntRange) and p["layers"].type.min == 1
    assert p["secret"].hidden


def test_parsed_values_reach_the_dataclass_typed():
    out = CliRunner().invoke(example, ["--out", "o", "--steps", "5", "--rate", "0.5", "--mode", "fast", "--resume",
                                       "--no-compile", "--init-head", "--data", "a", "--data", "b"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == repr(Example(out="o", steps=5, rate=0.5, mode="fast", resume=True, compile=False,
                                              init_head=True, data=("a", "b")))


@pytest.mark.parametrize("args, word", [(["--mode", "slow"], "slow"), (["--layers", "0"], "0"),
                                        (["--steps", "x"], "x"), ([], "--out")])
def test_bad_values_are_refused_by_click(args, word):
    result = CliRunner().invoke(example, (["--out", "o"] if word != "--out" else []) + args)
    assert result.exit_code == 2 and word in result.output


def test_help_is_the_attribute_docstring_with_field_names_as_flags():
    assert field_docs(Example)["out"] == "Where to write. Several sentences over two lines are one paragraph."
    p = params()
    assert p["out"].help == "Where to write. Several sentences over two lines are one paragraph."
    assert p["steps"].help == "Steps to run (see --rate)."
    text = CliRunner().invoke(example, ["--help"]).output
    assert "Input files; repeatable." in text and "--secret" not in text and "[default: 3]" in text


def test_an_annotation_without_a_click_type_is_refused():
    @dataclass
    class Bad:
        mapping: dict = dataclasses.field(default_factory=dict)
        """No click type."""

    with pytest.raises(TypeError, match="no click type"):
        click_options(Bad)


def test_train_options_are_train_settings():
    """eagle-pipe train's options are TrainSettings' fields: same names, defaults, help; a frozen value."""
    from stages.train.settings import TrainSettings
    from stages.train.stage import command

    fields = dataclasses.fields(TrainSettings)
    assert [p.name for p in command.params] == [f.name for f in fields]
    assert {p.name for p in command.params if p.required} == {"teacher_dir", "out"}
    resolved = command.make_context("train", ["--teacher-dir", "d", "--out", "o"]).params
    assert TrainSettings(**resolved) == TrainSettings(teacher_dir="d", out="o")
    docs = field_docs(TrainSettings)
    assert set(docs) == {f.name for f in fields}
    assert all(p.help for p in command.params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainSettings(teacher_dir="d", out="o").lr = 1.0


def test_a_pipeline_yaml_key_that_is_no_field_is_refused(tmp_path):
    from stages.cli import main

    config = tmp_path / "pipeline.yaml"
    config.write_text("train:\n  teacher_dir: d\n  learning_rate: 0.1\n")
    result = CliRunner().invoke(main, ["--config", str(config), "train", "--help"])
    assert result.exit_code != 0
    assert "unknown key(s) in section 'train': learning_rate" in (result.output + str(result.exception))


def test_dump_teacher_options_are_dump_options_and_the_vllm_flags():
    """dump-teacher's options: DumpOptions' fields (their defaults are plan_dump's), then the shared vLLM flags."""
    from stages.dump.options import DumpOptions
    from stages.dump.stage import command
    from stages.vllm_runtime import VLLM_PARAM_NAMES

    names = [f.name for f in dataclasses.fields(DumpOptions)]
    assert [p.name for p in command.params] == names + list(VLLM_PARAM_NAMES)
    resolved = command.make_context("dump-teacher", []).params
    assert DumpOptions(**{k: resolved[k] for k in names}) == DumpOptions()
    assert all(p.help for p in command.params)


def test_regenerate_options_are_regenerate_options_and_the_vllm_flags():
    from stages.regenerate.options import RegenerateOptions
    from stages.regenerate.stage import command
    from stages.vllm_runtime import VLLM_PARAM_NAMES

    names = [f.name for f in dataclasses.fields(RegenerateOptions)]
    assert [p.name for p in command.params] == names + list(VLLM_PARAM_NAMES)
    resolved = command.make_context("regenerate", []).params
    assert RegenerateOptions(**{k: resolved[k] for k in names}) == RegenerateOptions()
    assert all(p.help for p in command.params)


def test_eval_options_are_eval_options_and_the_vllm_flags():
    from stages.evaluate.options import EvalOptions
    from stages.evaluate.stage import command
    from stages.options import split_options
    from stages.vllm_runtime import VLLM_PARAM_NAMES

    names = [f.name for f in dataclasses.fields(EvalOptions)]
    assert [p.name for p in command.params] == names + list(VLLM_PARAM_NAMES)
    assert {p.name for p in command.params if p.required} == {"target", "draft", "data"}
    resolved = command.make_context("eval", ["--target", "t", "--draft", "d", "--data", "q.jsonl",
                                             "--draft-tokens", "3,5", "--tensor-parallel-size", "2"]).params
    options, rest = split_options(EvalOptions, resolved)
    assert options == EvalOptions(target="t", draft="d", data=("q.jsonl",), draft_tokens=[3, 5])
    assert set(rest) == set(VLLM_PARAM_NAMES) and rest["tensor_parallel_size"] == 2
    assert all(p.help for p in command.params)


def test_the_vllm_flags_are_vllm_options_fields_but_dtype():
    """`cli=False` keeps VllmOptions.dtype (filled from the stage's --dtype) off the command line; every flag's
    help starts with "(vllm)"; --vllm-args parses a JSON object and defaults to {}."""
    from stages.vllm_runtime import VLLM_PARAM_NAMES, VllmOptions, vllm_options

    @click.command()
    @vllm_options
    def cmd(**kwargs):
        pass

    assert [p.name for p in cmd.params] == list(VLLM_PARAM_NAMES) == [
        f.name for f in dataclasses.fields(VllmOptions) if f.name != "dtype"]
    assert all(p.help.startswith("(vllm) ") for p in cmd.params)
    assert cmd.make_context("cmd", []).params["vllm_args"] == {}
    parsed = cmd.make_context("cmd", ["--vllm-args", '{"quantization": "fp8"}', "--enforce-eager"]).params
    assert VllmOptions.from_params(parsed) == VllmOptions(enforce_eager=True, vllm_args={"quantization": "fp8"})
    bad = CliRunner().invoke(cmd, ["--vllm-args", "[1]"])
    assert bad.exit_code == 2 and "expected a JSON object" in bad.output
