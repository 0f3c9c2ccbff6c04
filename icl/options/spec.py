"""How an option is defined once and becomes a flag of a command: the field spec, the parser generator, the check.

Why a generator: ``train_3d.py``, ``eval_3d.py`` and ``python -m icl.segment`` share options; writing each
command's argparse parser by hand typed the same option (help, type, default, check) two or three times. Here an
option is a dataclass field carrying an :class:`Opt`; :func:`build_parser` turns a dataclass into the command's
parser in its spelling (``Options.DASHES``: the seed's ``-image_size`` or conventional ``--image-size``) and
:func:`validate` checks the values once, naming the flag as the command spells it. The options themselves are
defined in :mod:`icl.options.common` and one module per command.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from icl.errors import InputError, report, spell_flag
from icl.model.boundary import library_errors

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def str2bool(text: str | bool) -> bool:
    """Parse ``True/False/true/false/1/0`` (MedSAM2-ICL passes booleans as words)."""
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {text!r}")


@dataclass(frozen=True)
class Opt:
    """How one option is typed, checked and explained; calling it makes a dataclass field (``changes`` win)."""

    default: Any = None
    help: str = ""
    type: Callable[[str], Any] = str
    choices: tuple = ()
    check: Callable[[Any], Any] | None = None  # value -> normalised value; raises ValueError(problem)
    required: bool = False
    repeat: bool = False  # given once per item (--support A --support B): a list, in the order given

    def __call__(self, **changes: Any) -> Any:
        spec = dataclasses.replace(self, **changes)
        return field(default=spec.default, metadata={"opt": spec})


def opt(default: Any = None, help: str = "", type: Callable[[str], Any] = str, **kwargs: Any) -> Any:
    """A field for an option only one command has."""
    return Opt(default, help, type, **kwargs)()


# ----------------------------------------------------------------------------------------------------- commands
class Options:
    """What every command's options share: their spelling, their help texts and how they are written out."""

    DASHES: ClassVar[str] = "-"
    DESCRIPTION: ClassVar[str] = ""
    EPILOG: ClassVar[str | None] = None

    def flag(self, name: str) -> str:
        """Option ``name`` as this command spells it (``-image_size`` or ``--image-size``)."""
        return spell_flag(name, self.DASHES)

    def finish(self) -> None:
        """Defaults that follow other options, and checks that involve several options."""

    def check_files(self) -> None:
        """Checks of the named files and configs, before any model is built or data read."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (for checkpoints, wandb and eval_config.json)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


class StoreOnce(argparse.Action):
    """Store a single-value option, refusing it given twice (``--out a --out b`` would keep ``b`` without a word)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_given", set())
        if self.dest in seen:
            raise argparse.ArgumentError(self, f"given more than once ({option_string} takes one value)")
        namespace._given = seen | {self.dest}
        setattr(namespace, self.dest, values)


NEGATIVE_VALUE = re.compile(r"^-\.?\d")  # -100,200  -0.5  -.5: a value, never a flag


def join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--window -100,200`` → ``--window=-100,200``: argparse reads a value starting with '-' as a flag unless it
    is a plain number, so a negative window (or any value like it) would need '='; here it does not."""
    out: list[str] = []
    takes_value = {flag for action in parser._actions if action.nargs is None and not isinstance(
        action, (argparse._StoreTrueAction, argparse._HelpAction)) for flag in action.option_strings}
    i = 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser that raises InputError (naming the flag) instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        match = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message)
        if match:
            raise InputError(match.group(1), match.group(2))
        match = re.match(r"the following arguments are required: (.*)", message)
        if match:
            raise InputError(match.group(1), "required, not given")
        raise InputError("arguments", message)


def build_parser(cls: type[Options], **kwargs: Any) -> argparse.ArgumentParser:
    """The argparse parser of the command whose options are ``cls``'s fields, in that command's spelling.

    Booleans are ``True``/``False`` words with one dash (the seed's) and store-true switches with two. Choices are
    shown in the usage but checked by :func:`validate`, with every other check. Every help text ends with its
    default, unless it says the default itself.
    """
    kwargs.setdefault("description", cls.DESCRIPTION)
    kwargs.setdefault("epilog", cls.EPILOG)
    parser = OneLineParser(exit_on_error=False, **kwargs)
    for f in dataclasses.fields(cls):
        spec: Opt = f.metadata["opt"]
        flag = spell_flag(f.name, cls.DASHES)
        if spec.type is bool and cls.DASHES == "--":
            parser.add_argument(flag, dest=f.name, action="store_true", help=spec.help)
            continue
        choices = ("True", "False") if spec.type is bool else spec.choices
        once = {"action": "append" if spec.repeat else StoreOnce}  # a flag given twice: an error, never the last
        parser.add_argument(flag, dest=f.name, type=str2bool if spec.type is bool else spec.type, **once,
                            default=spec.default, required=spec.required, help=help_with_default(spec),
                            metavar="{" + ",".join(map(str, choices)) + "}" if choices else None)
    return parser


def help_with_default(spec: Opt) -> str:
    """``spec.help`` with ``(default: X)`` appended; unchanged when required, without a default, or when the text
    already names its default. ``%`` is escaped for argparse."""
    text = spec.help
    if not spec.required and spec.default is not None and "default" not in text.lower():
        text = f"{text} (default: {spec.default})"
    return text.replace("%", "%%")


def validate(cfg: Options, check_files: bool = True) -> None:
    """THE check of a command's options: every field's choices and check, then ``finish`` and the file checks."""
    for f in dataclasses.fields(cfg):
        spec: Opt = f.metadata["opt"]
        value = getattr(cfg, f.name)
        if value is None:  # not given, or none
            continue
        try:
            items = value if spec.repeat else [value]
            for item in items:
                if spec.choices and item not in spec.choices:
                    raise ValueError(f"invalid choice: {item!r} (choose from {', '.join(map(str, spec.choices))})")
            if spec.check is not None:
                checked = [spec.check(item) for item in items]
                setattr(cfg, f.name, checked if spec.repeat else checked[0])
        except ValueError as err:
            raise InputError(cfg.flag(f.name), str(err)) from None
    cfg.finish()
    if check_files:
        cfg.check_files()


def parse_one_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` whose every error is an InputError naming the flag (no usage block)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        namespace = parser.parse_args(join_negative_values(parser, args))
    except argparse.ArgumentError as err:
        raise InputError(err.argument_name or "arguments", err.message) from None
    vars(namespace).pop("_given", None)
    return namespace


def parse_options(cls: type[Options], argv: Sequence[str] | None, check_files: bool = True,
                  parser: argparse.ArgumentParser | None = None) -> Any:
    """Command line -> validated ``cls`` (``check_files=False`` skips the file-system and model-config checks)."""
    values = vars(parse_one_line(parser or build_parser(cls), argv))
    cfg = cls(**values)
    validate(cfg, check_files=check_files)
    return cfg


def run_command(parse: Callable[[Sequence[str] | None], Options], work: Callable[[Any], Any],
                argv: Sequence[str] | None) -> int:
    """A command's entry: parse the options and do the work; bad input is one ``error: ...`` line and exit 2."""
    try:
        options = parse(argv)
        with library_errors(options.DASHES):  # sam2_ext's option names, spelled as this command's flags
            work(options)
    except InputError as err:
        return report(err)
    return 0
