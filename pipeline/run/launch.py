"""torchrun, as the run_*.sh launchers start it:
`python -m pipeline.run.launch [torchrun flags] script [args]`.

Same flags and the same elastic agent as torchrun (torch.distributed.run), with three differences:
- it gets SIGTERM when its parent (the run_<stage>.sh shell) dies, even by SIGKILL, and the agent
  then stops the workers with SIGTERM (each saves a checkpoint and exits); the workers in turn watch
  this process (pipeline/run/process.py), so nothing of a stage outlives its launcher;
- a failed worker ends it with that worker's exit code (2: a user error, which the worker has said
  in one sentence; 143: stopped by SIGTERM) and at most one line of its own, not torchrun's
  ChildFailedError traceback and code 1. PIPELINE_DEBUG=1 shows torch's own log again;
- a signal ignored when it starts stays ignored (nohup's SIGHUP: a logout does not stop the
  workers).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from pipeline.errors import debug_enabled
from pipeline.run.process import PARENT_PID_ENV, die_with_parent


def exit_code(failure_code: int) -> int:
    """A worker's exit status as a shell reports it: a death by signal N becomes 128 + N."""
    return 128 - failure_code if failure_code < 0 else failure_code


def _signals_to_handle(given: str) -> str:
    """The signals torch's agent turns into "stop the workers", less those ignored on entry: they
    stay ignored. nohup ignores SIGHUP; a shell's background job ignores SIGINT and SIGQUIT, and
    scripts/torchrun.sh, which starts this in the background, turns its own SIGINT into a SIGTERM (a
    checkpoint first) instead."""

    def ignored(name: str) -> bool:
        sig = getattr(signal, name.strip(), None)
        return sig is not None and signal.getsignal(sig) is signal.SIG_IGN

    return ",".join(name for name in given.split(",") if not ignored(name))


def main(argv: list[str] | None = None) -> int:
    die_with_parent(signal.SIGTERM)
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # what the workers check their parent against

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not debug_enabled():
        # torch's agent logs a worker's failure and the shutdown after it: the stage has said why
        # already. Only the agent runs in this process, and torch's handlers sit on many loggers:
        # mute them all here.
        logging.disable(logging.ERROR)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.signals_to_handle = _signals_to_handle(args.signals_to_handle)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = exit_code(failure.exitcode)
        if code not in (
            2,
            143,
        ):  # those the stage explains itself (pipeline/errors.py, checkpoints.py)
            print(
                f"launch: rank {rank} (pid {failure.pid}) failed with exit code {code}",
                file=sys.stderr,
            )
        return code
    except (
        SignalException
    ) as e:  # the agent has stopped the workers with this signal and waited for them
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
