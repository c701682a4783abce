"""Subprocess worker for the SIGKILL resume test: `python fit_worker.py OUT_DIR KILL_AT` kills itself
after optimizer step KILL_AT of the run in `train_toys.run_resumable`."""

import os
import signal
import sys

from train_toys import run_resumable


def main() -> None:
    out_dir = sys.argv[1]
    kill_at = int(sys.argv[2])

    def kill(step: int, logs: dict) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_resumable(out_dir, callbacks=[kill])


if __name__ == "__main__":
    main()
