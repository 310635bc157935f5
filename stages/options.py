"""A stage's click options generated from its settings dataclass: one declaration per option.

Each field of a frozen dataclass becomes one `--field-name` option (litgpt style):

    teacher_dir: str = option(type=click.Path(file_okay=False))
    \"\"\"Teacher dump written by `eagle-pipe dump-teacher`.\"\"\"      <- the help text
    attention: Literal["auto", "dense", "flex"] = "auto"         <- click.Choice, default from here
    resume: bool = False                                         <- --resume (a flag)
    compile: bool = True                                         <- --compile/--no-compile
    data: tuple[str, ...] = ()                                   <- repeatable --data

The type decides the click type: str, int, float, bool, `X | None` (default None, no default shown),
`Literal[...]` (choices), `tuple[X, ...]` (`multiple=True`). A field without a default is a required option.
Anything else click needs (an IntRange, a Path type, `--x/--no-x` for a flag that defaults off, hidden) is
given as keyword arguments of `option(default, **click_kwargs)`, which keeps them in the field's metadata; a
`type=` given there wins, so a field of another type (a list parsed from "3,5") names its own click.ParamType;
`cli=False` keeps a field off the command line (a value the stage fills in).
A field named in backquotes in a docstring (`seq_len`) reads as its flag (--seq-len) in `--help`.
Defaults and help come only from the dataclass, so `--help`, `pipeline.yaml` keys (stages/config.py checks them
against the command's params) and the typed settings cannot drift apart.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Literal

import click

CLICK = "click"  # the metadata key holding a field's extra click keyword arguments


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           **click_kwargs) -> Any:
    """A dataclass field whose click option gets `click_kwargs` too (e.g. `type=click.IntRange(min=1)`,
    `negatable=True` for `--x/--no-x` on a flag that defaults off, `hidden=True`; `cli=False`: no option)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={CLICK: click_kwargs})


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options (all but those declared with `cli=False`)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get(CLICK, {}).get("cli", True)]


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring}, read from the class source (the string right after the field),
    whitespace collapsed to one paragraph; base classes first, so a subclass may override a doc."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _click_type(hint) -> tuple[Any, bool]:
    """(click type, multiple) for one resolved annotation; `X | None` is X (None is then the default)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{hint}: only `X | None` unions become options")
        return _click_type(rest[0])
    if origin is Literal:
        return click.Choice([str(a) for a in args]), False
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{hint}: only tuple[X, ...] becomes a repeatable option")
        return _click_type(args[0])[0], True
    if hint in (str, int, float, bool):
        return hint, False
    raise TypeError(f"{hint}: no click type for this annotation (give option(type=...))")


def click_options(cls: type, help_prefix: str = ""):
    """A decorator adding one click option per field of the dataclass `cls`, in field order; `help_prefix` starts
    every help text (e.g. "(vllm) " for flags only one engine reads)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    names = {f.name for f in option_fields(cls)}

    def as_flag(match: re.Match) -> str:
        return "--" + match[1].replace("_", "-") if match[1] in names else match[0]

    made = []
    for f in option_fields(cls):
        extra = dict(f.metadata.get(CLICK, {}))
        extra.pop("cli", None)
        try:
            click_type, multiple = _click_type(hints[f.name])
        except TypeError:
            if "type" not in extra:  # an annotation click cannot parse needs its own ParamType
                raise
            click_type, multiple = extra["type"], False
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": help_prefix + re.sub(r"`(\w+)`", as_flag, docs.get(f.name, ""))}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if multiple:
            kwargs["multiple"] = True
        if click_type is bool:
            if extra.pop("negatable", False) or kwargs.get("default") is True:
                flag = f"{flag}/--no-{flag[2:]}"
                kwargs["show_default"] = True
            else:
                kwargs["is_flag"] = True
        else:
            kwargs["type"] = click_type
            kwargs["show_default"] = kwargs.get("default") not in (None, ())
        kwargs.update(extra)
        made.append(click.option(flag, f.name, **kwargs))

    def decorate(command):
        for add in reversed(made):
            command = add(command)
        return command

    return decorate


def split_options(cls: type, options: dict) -> tuple[Any, dict]:
    """(cls built from the options that are its fields, the rest): a command's keyword arguments split into its
    own settings and what another decorator added (the @vllm_options flags)."""
    names = {f.name for f in dataclasses.fields(cls)}
    own = {k: v for k, v in options.items() if k in names}
    return cls(**own), {k: v for k, v in options.items() if k not in names}


class ParsedType(click.ParamType):
    """A click type from a parser that refuses bad input with a StageError (one line): the same parser reads
    the command line and pipeline.yaml, and its message becomes click's usage error."""

    def __init__(self, name: str, parse):
        self.name, self.parse = name, parse

    def convert(self, value, param, ctx):
        from stages.errors import StageError

        try:
            return self.parse(value)
        except StageError as exc:
            self.fail(exc.format_message(), param, ctx)
