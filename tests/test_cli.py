"""jaxdiff.cli: the one convention of every command, and options derived from a dataclass."""

import dataclasses

import pytest
from absl import flags

from jaxdiff import cli


@dataclasses.dataclass(frozen=True)
class Inner:
  method: str = dataclasses.field(default="ddim", metadata={"help": "Sampler."})
  scale: float | None = dataclasses.field(default=None, metadata={"help": "A scale."})


@dataclasses.dataclass(frozen=True)
class Options:
  path: str | None = dataclasses.field(default=None, metadata={"help": "A path."})
  count: int = dataclasses.field(default=3, metadata={"help": "How many."})
  flag: bool = dataclasses.field(default=True, metadata={"help": "On or off."})
  labels: tuple[int, ...] = dataclasses.field(default=(), metadata={"help": "Labels."})
  inner: Inner = Inner()


def _parse(argv):
  values = flags.FlagValues()
  cli.define_flags(Options, values)
  values(["prog", *argv])
  return values, cli.options_from_flags(Options, values)


def test_flags_come_from_the_dataclass_and_parse_back():
  values, defaults = _parse([])
  assert defaults == Options()
  assert values["count"].help == "How many." and values["method"].help == "Sampler."
  _, options = _parse(["--path=x", "--count=7", "--noflag", "--labels=3, 5,7", "--method=ddpm",
                       "--scale=1.5"])
  assert options == Options(path="x", count=7, flag=False, labels=(3, 5, 7),
                            inner=Inner(method="ddpm", scale=1.5))


def test_parse_tuple():
  assert cli.parse_tuple("labels", " 3, 5,7") == (3, 5, 7)
  assert cli.parse_tuple("labels", "") == ()
  assert cli.parse_tuple("interval", "0.5,2", float) == (0.5, 2.0)
  with pytest.raises(cli.UsageError, match="--labels='a,b' must be comma-separated integers"):
    cli.parse_tuple("labels", "a,b")
  with pytest.raises(cli.UsageError, match="--interval='x' must be comma-separated numbers"):
    cli.parse_tuple("interval", "x", float)


def test_fail_prints_one_line_and_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.fail("two\nlines   here")
  assert exit_info.value.code == cli.EXIT_ERROR == 2
  assert capsys.readouterr().err == "error: two lines here\n"


def test_call_reports_only_the_listed_errors(capsys):
  def run(options):
    if options == "bad":
      raise FileNotFoundError("no such file: x.npz")
    if options == "bug":
      raise KeyError("a bug is a traceback, not a one-line error")
    return options
  assert cli.call(run, "ok", (FileNotFoundError,)) == "ok"
  with pytest.raises(SystemExit) as exit_info:
    cli.call(run, "bad", (FileNotFoundError,))
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: no such file: x.npz\n"
  with pytest.raises(KeyError):
    cli.call(run, "bug", (FileNotFoundError,))
