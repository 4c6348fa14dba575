"""Command line: `python -m jaxkd.main --config configs/demo.py --workdir runs/demo`.

Any config field can be overridden: `--config.student.name=resnet8x4 --config.optimizer.lr=0.1`.
A config file may take an argument after a colon: `--config configs/demo.py:runlocal`.

`--print_config` lists every field of the recipe after the overrides, one `name = value` a line
(each one settable as `--config.<name>=`), and exits without doing anything:

    python -m jaxkd.main --config configs/demo.py:runlocal --print_config

`--plan` checks everything and prints the run's plan (jaxkd/plan.py), one stage a line: its
network, method, epochs, steps, images per step, learning rate, teacher and its state in the
workdir (done, resume from step N, to run), and exits without writing anything:

    python -m jaxkd.main --config configs/demo.py --workdir runs/demo --plan

Every field is checked before anything is written (jaxkd/config_checks.py, called by the plan): a
misspelt field (with the nearest name), a missing or broken config file, a value of the wrong type
or out of its range ends with one line `error: …` and exit status 2.

Several processes (hosts of a TPU pod slice, GPU nodes) run the same command with `--distributed`
(TPU pods, SLURM, Open MPI detect the rest) or with `--coordinator_address=host:port
--num_processes=N --process_id=i`; see jaxkd/distributed.py.

A signal at any moment, from the start of the process to its exit, ends the run with one line and
exit status 130 (SIGINT) or 143 (SIGTERM); see jaxkd/interrupts.py.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
if __name__ == "__main__":
  # First, before the heavy imports: signals are jaxkd's from here to the exit.
  from jaxkd import interrupts as _interrupts
  _interrupts.install()
elif __name__ == "__mp_main__":
  # An input worker (multiprocessing imports this module first in each one it starts): Ctrl-C
  # reaches the terminal's whole process group, and the trainer stops its workers itself.
  import signal as _signal
  for _signum in (_signal.SIGINT, _signal.SIGTERM):
    _signal.signal(_signum, _signal.SIG_IGN)
# pylint: enable=g-import-not-at-top,wrong-import-position

import dataclasses
import os
import re
import signal
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from jaxkd import cli
from jaxkd import config_checks
from jaxkd import distributed
from jaxkd import interrupts
from jaxkd.errors import LostProcess, UserError

_CONFIG_HELP = "Recipe file, with an optional argument after a colon: configs/demo.py:runlocal."
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "True or False", str: "a string",
               tuple: "a tuple, e.g. '(1, 2)'"}


@dataclasses.dataclass(frozen=True)
class Command:
  """A parsed command line: the config after its overrides, and the other flags."""
  config: ml_collections.ConfigDict
  workdir: Optional[str]
  print_config: bool = False
  show_plan: bool = False
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  distributed: bool = False
  verbosity_given: bool = False


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str],
                 config: Optional[ml_collections.ConfigDict]) -> None:
  """The flags of the command on `flag_values`; `--config.<field>` overrides of `config` (a
  loaded recipe) are read from `argv`. Without `config` (absl's help) `--config` is a string."""
  if config is None:
    flags.DEFINE_string("config", None, _CONFIG_HELP, flag_values=flag_values)
  else:
    config_flags.DEFINE_config_dict("config", config, _CONFIG_HELP, flag_values=flag_values,
                                    lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.",
                      flag_values=flag_values)
  flags.DEFINE_bool("print_config", False, "Print every config field after the overrides "
                    "(name = value) and exit.", flag_values=flag_values)
  flags.DEFINE_bool("plan", False, "Check everything, print the run's stages (epochs, steps, "
                    "teacher, state in the workdir) and exit without writing anything.",
                    flag_values=flag_values)
  # Multi-process runs (jaxkd/distributed.py): all three flags, or --distributed to detect them.
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: "
                      "$JAX_COORDINATOR_ADDRESS).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes of the run.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. N-1.",
                       flag_values=flag_values)
  flags.DEFINE_bool("distributed", False, "Detect the processes of the run (TPU pod slice, "
                    "SLURM, Open MPI).", flag_values=flag_values)


def split_config_spec(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
  """The value of `--config` (its last one) and `argv` without it (the overrides stay)."""
  spec, rest, i = None, [], 0
  while i < len(argv):
    match = re.match(r"^--?config(=(.*))?$", argv[i]) if i else None
    if match and match.group(1) is not None:
      spec = match.group(2)
    elif match:
      spec = argv[i + 1] if i + 1 < len(argv) else ""
      i += 1
    else:
      rest.append(argv[i])
    i += 1
  return spec, rest


def parse(argv: Sequence[str], flag_values: flags.FlagValues) -> Command:
  """The command line `argv` (argv[0] the program) parsed on `flag_values`, which holds none of
  this command's flags yet. Raises a one-line UserError for every mistake in it."""
  argv = _parse_flags(flag_values.read_flags_from_files, list(argv), force_gnu=False)
  if any(cli.HELP.match(arg) for arg in argv[1:]):
    define_flags(flag_values, argv, None)
    _parse_flags(flag_values, argv)  # absl's --help prints this module's docstring and exits.
  spec, argv = split_config_spec(argv)
  if spec is None:
    raise UserError("--config is required: a recipe file, e.g. --config configs/demo.py "
                    "(--helpfull lists every flag)")
  config = config_checks.load_config(spec)
  config_checks.check_override_paths(config, config_checks.override_paths(argv))
  define_flags(flag_values, argv, config)
  rest = _parse_flags(flag_values, argv, config=config)
  if len(rest) > 1:
    raise UserError(f"unexpected arguments: {' '.join(rest[1:])}; flags take the form "
                    "--name=value")
  command = Command(
      config=flag_values["config"].value, workdir=flag_values["workdir"].value,
      print_config=flag_values["print_config"].value,
      show_plan=flag_values["plan"].value,
      coordinator_address=flag_values["coordinator_address"].value,
      num_processes=flag_values["num_processes"].value,
      process_id=flag_values["process_id"].value,
      distributed=flag_values["distributed"].value,
      verbosity_given="verbosity" in flag_values and flag_values["verbosity"].present)
  if not command.workdir and not command.print_config and not command.show_plan:
    raise UserError("--workdir is required: the directory for checkpoints, logs and results")
  return command


def _parse_flags(parse_fn, argv: list[str], config: Optional[ml_collections.ConfigDict] = None,
                 **kwargs) -> list[str]:
  """`parse_fn(argv)` with absl's errors as one-line UserErrors; a value of the wrong type for
  a config field also names the type the field takes."""
  try:
    return parse_fn(argv, **kwargs)
  except flags.Error as e:
    message = config_checks.one_line(e)
    match = re.match(r"flag --config\.([\w.]+)=", message)
    if match and config is not None:
      holder, _, key = match.group(1).rpartition(".")
      kind = config_checks.lookup(config, holder) if holder else config
      wanted = kind.get_type(key)
      message += f"; --config.{match.group(1)} takes {_TYPE_NAMES.get(wanted, wanted.__name__)}"
    raise UserError(message) from None


def execute(command: Command) -> int:
  """Runs a parsed command; returns its exit status. Every field is checked (by the plan)
  before the workdir is touched; a UserError ends the run with one line `error: …`."""
  try:
    if command.print_config:
      print("\n".join(config_checks.applied_field_lines(command.config)))
      return 0
    return _train(command)
  except UserError as e:
    return report(e)
  except KeyboardInterrupt:
    # Python's own Ctrl-C, where the command's handlers were not installed (run() in a
    # notebook): nothing is known of what was in flight.
    print("error: interrupted (SIGINT); every finished stage and checkpoint stays: run the "
          "same command again to go on", file=sys.stderr)
    return 128 + signal.SIGINT


def _train(command: Command) -> int:
  # Library INFO logs (orbax, clu) would drown the progress line; -v 0 brings them back.
  if not command.verbosity_given:
    logging.set_verbosity(logging.WARNING)
  cli.quiet_libraries(command.verbosity_given)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxkd import train  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  distributed.initialize(command.coordinator_address, command.num_processes,
                         command.process_id, command.distributed)
  distributed.watch(_end_lost)
  if not distributed.is_main_process():
    # Process 0 alone prints progress and the table; the others' errors still reach stderr.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    logging.set_verbosity(logging.ERROR)
  if command.show_plan:
    from jaxkd import parallel  # pylint: disable=g-import-not-at-top
    from jaxkd import plan  # pylint: disable=g-import-not-at-top
    run_plan = plan.make_plan(command.config, command.workdir, parallel.create_mesh(),
                              cache=False)
    print(plan.describe(run_plan))
    return 0
  train.train_and_evaluate(command.config, command.workdir)
  return 0


def report(error: UserError) -> int:
  """Prints `error: …` on stderr; returns the error's exit status."""
  print(f"error: {error}", file=sys.stderr)
  return error.exit_status


def run(argv: Sequence[str]) -> int:
  """The command line in this process: `run(['jaxkd.main', '--config', ..., '--workdir', ...])`
  returns the exit status `python -m jaxkd.main` would have. Flags are parsed on a fresh
  FlagValues each call; absl's own flags (--help, -v) exist only in the real entry point."""
  try:
    command = parse(argv, flags.FlagValues())
  except UserError as e:
    return report(e)
  return execute(command)


def _main() -> None:
  """The real entry point: absl's app.run (help, logging) with this module's parser; the
libraries' start-up lines are silenced first (jaxkd.cli)."""
  cli.quiet_environment(sys.argv)
  parsed = []

  def parser(argv: list[str]) -> list[str]:
    try:
      parsed.append(parse(argv, flags.FLAGS))
    except UserError as e:
      sys.exit(report(e))
    except SystemExit as e:  # absl's --help exits with status 1: 0 here.
      sys.exit(cli.help_exit_status(e, argv))
    return argv[:1]

  app.run(lambda argv: _exit_status(execute(parsed[0])), flags_parser=parser)


def _exit_status(status: int) -> int:
  """The command's exit status after the run returned `status` (a signal after the stages
  counts, jaxkd.interrupts). A process of a multi-process run that lost another one ends here
  at once: JAX's shutdown at the exit would wait for the lost one."""
  status = interrupts.exit_status(status)
  distributed.end_watch()
  if status == LostProcess.exit_status:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  return status


def _end_lost(what: str) -> None:
  """Ends this process at once with one line when another process of the run was lost (called
  from jaxkd.distributed's watch thread while the main thread may hang in a collective)."""
  interrupts.end_process(distributed.lost_message(what, interrupts.what_stays()),
                         LostProcess.exit_status)


if __name__ == "__main__":
  _main()
