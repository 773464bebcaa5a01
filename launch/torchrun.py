"""torchrun, ending with the exit code of a failure the training processes explained themselves.

`omni-launch` starts `python -m launch.torchrun ...` (torchrun's own arguments) instead of torchrun. When every
failed process ended with one of omni-train's own exit codes (2: a configuration, data or environment error;
3: a lost peer; 4: a diverged run) it has already said why in one line, and this ends with that code instead of
torchrun's ChildFailedError trace and table (which end with exit code 1 whatever the processes said); the processes torchrun stopped after
that failure (SIGTERM) do not count. Any other failure (a crash, a signal, a programming error) keeps torchrun's report, and its trace is in the process's output.
Restarts (`--max-restarts`) are torchrun's, unchanged.
"""

from __future__ import annotations

import signal
import sys

# omni_train/cli.py's exit codes; 1 stays torchrun's (and Python's own for an uncaught exception).
EXPLAINED = {2, 3, 4}


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        # the processes that explained themselves, and those torchrun then stopped (SIGTERM)
        codes = {failure.exitcode for failure in e.failures.values()}
        explained = codes & EXPLAINED
        if explained and codes <= EXPLAINED | {-signal.SIGTERM}:
            sys.exit(max(explained))
        raise


if __name__ == "__main__":
    main()
