"""Command line: `python -m jaxkd.main --config configs/demo.py --workdir runs/demo`.

Any config field can be overridden: `--config.student.name=resnet8x4 --config.optimizer.lr=0.1`.
A config file may take an argument after a colon: `--config configs/demo.py:runlocal`.

Several processes (hosts of a TPU pod slice, GPU nodes) run the same command with `--distributed`
(TPU pods, SLURM, Open MPI detect the rest) or with `--coordinator_address=host:port
--num_processes=N --process_id=i`; see jaxkd/distributed.py.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxkd.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])

# Multi-process runs (jaxkd/distributed.py): all three flags, or --distributed to detect them.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. N-1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Detect the processes of the run (TPU pod slice, SLURM, Open MPI).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Library INFO logs (orbax, clu) would drown the progress line; -v 0 brings them back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxkd import distributed  # pylint: disable=g-import-not-at-top
  from jaxkd import train  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _DISTRIBUTED.value)
    if not distributed.is_main_process():
      # Process 0 alone prints progress and the table; the others' errors still reach stderr.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      logging.set_verbosity(logging.ERROR)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
