"""The one convention of every jaxdiff command (`python -m jaxdiff.train | sample | evaluate`).

- Success exits with status 0.
- Bad input (a flag, a config field, a file, a checkpoint that does not fit) is found before
  anything is written and reported as ONE line on stderr, `error: <what is wrong and the fix>`,
  with exit status 2 (`EXIT_ERROR`).
- `python -m jaxdiff.train` stopped by SIGTERM saves a checkpoint first and exits with 143.

The options of sample and evaluate are a frozen dataclass whose fields carry their help text:
`define_flags` derives the absl flags from it and `options_from_flags` turns the parsed flags back
into the dataclass, so every option is written once.
"""

import dataclasses
import sys
import types
import typing
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags

EXIT_ERROR = 2
EXIT_PREEMPTED = 143


class UsageError(ValueError):
  """Bad input to a command, reported as one `error:` line (exit status 2)."""


def one_line(text: Any) -> str:
  """`text` with every run of whitespace (newlines too) collapsed to one space."""
  return " ".join(str(text).split())


def fail(message: Any, status: int = EXIT_ERROR) -> NoReturn:
  """Prints `error: message` as one line on stderr and exits with `status`."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv: list[str], validate: Callable[[], Any] | None = None) -> list[str]:
  """absl flag parsing that reports a bad flag, config file or config override on one line.

  `validate`, if given, runs after parsing (e.g. loading a lazily read config file) and its
  errors are reported the same way.
  """
  try:
    remaining = flags.FLAGS(argv)
    if validate is not None:
      validate()
    return remaining
  except Exception as error:  # pylint: disable=broad-exception-caught
    # absl raises flags.Error; config_flags also KeyError/AttributeError/ValueError for a bad
    # override or config file.
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    lines = text.strip().splitlines()
    if any(line.startswith("Traceback") for line in lines):  # an error inside the config file
      text = f"{lines[0].split(': Error whilst')[0]}: {lines[-1].strip()}"
    fail(f"bad flag: {one_line(text) or repr(error)}")


def _flag_kind(annotation: Any) -> tuple[Any, bool]:
  """(the non-None type of a field annotation, whether None is allowed)."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0], True
  return annotation, False


def _option_fields(options_cls: type) -> list[dataclasses.Field]:
  """The dataclass's fields, with nested dataclass fields flattened in their place."""
  fields = []
  for field in dataclasses.fields(options_cls):
    if dataclasses.is_dataclass(field.type):
      fields += _option_fields(field.type)
    else:
      fields.append(field)
  return fields


def define_flags(options_cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of `options_cls` (nested dataclasses flattened).

  Field types: str, int, float, bool, `X | None` (default None) and tuple[int, ...] or
  tuple[float, ...] (given comma-separated). The help text is the field's `metadata["help"]`.
  """
  definers = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              bool: flags.DEFINE_bool}
  for field in _option_fields(options_cls):
    kind, _ = _flag_kind(field.type)
    help_text = field.metadata.get("help", field.name)
    if typing.get_origin(kind) is tuple:
      flags.DEFINE_string(field.name, ",".join(map(str, field.default)), help_text,
                          flag_values=flag_values)
    else:
      definers[kind](field.name, field.default, help_text, flag_values=flag_values)


def parse_tuple(name: str, text: str, element: type = int) -> tuple:
  """'3, 5,7' -> (3, 5, 7) of `element`s; '' -> (); anything else is a UsageError naming --name."""
  try:
    return tuple(element(part) for part in text.split(",") if part.strip())
  except ValueError:
    kind = "integers" if element is int else "numbers"
    raise UsageError(f"--{name}={text!r} must be comma-separated {kind}") from None


def options_from_flags(options_cls: type, flag_values: flags.FlagValues = flags.FLAGS):
  """The dataclass `options_cls` from the parsed flags of `define_flags`."""
  values = {}
  for field in dataclasses.fields(options_cls):
    if dataclasses.is_dataclass(field.type):
      values[field.name] = options_from_flags(field.type, flag_values)
      continue
    value = flag_values[field.name].value
    kind = _flag_kind(field.type)[0]
    if typing.get_origin(kind) is tuple:
      value = parse_tuple(field.name, value, typing.get_args(kind)[0])
    values[field.name] = value
  return options_cls(**values)


def call(run: Callable[[Any], Any], options: Any, errors: tuple[type[Exception], ...]) -> Any:
  """`run(options)`, with the `errors` reported by `fail` (one line, exit status 2)."""
  try:
    return run(options)
  except errors as error:
    fail(error)


def main(options_cls: type, run: Callable[[Any], Any],
         errors: tuple[type[Exception], ...]) -> None:
  """Runs a command: flags from `options_cls`, then `run(options)` under the convention."""
  define_flags(options_cls)

  def program(argv: list[str]) -> None:
    if len(argv) > 1:
      fail(f"unexpected arguments {argv[1:]}")
    try:
      options = options_from_flags(options_cls)
    except UsageError as error:
      fail(error)
    call(run, options, errors)

  app.run(program, flags_parser=parse_flags)
