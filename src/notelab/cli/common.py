"""What every ``notelab`` verb shares: training options, run folders, seeding, threads, exit codes.

A family's CLI module adds its verbs' options with ``add_training_options`` / ``add_out_option`` /
``add_model_options``; a verb checks them (``check_training_options``, ``prepare_out``) before any
work and wraps the work that writes the run folder in ``with folder:``. New families get the same
behaviour without copying it:

- ``--out`` refuses a folder that holds anything but this verb's own run being resumed, unless
  ``--overwrite`` (the old folder is replaced whole: moved aside, and removed once the new run has
  finished; on failure the old folder comes back) or ``--resume``; an ``--out`` that is a file or
  cannot be created is a one-line error before anything is read or written.
- ``--seed`` seeds every generator (Python, NumPy, torch) before the model is built.
- ``--resume`` of a run that already reached ``--steps`` says so instead of training
  (``already_complete``).
- ``--parallel fsdp`` shards the model over the processes ``torchrun --nproc-per-node N`` starts
  (``notelab.train.parallel``); every training verb runs under torchrun unchanged.
- ``--allow-large`` lifts the model size bound for everything the verb builds or loads.
- torch's intra-op threads are capped at the cores the process may really use (CPU affinity and
  the cgroup CPU quota), so a container limited to 2 cores does not run 16 threads.
- every expected failure (``NotelabError``, ``OSError``, ``UnicodeError``) becomes one line on
  stderr and exit code 2 (``run_verb``).

Nothing here imports torch at import time: ``notelab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from notelab.core.errors import ConfigError, NotelabError

MARKER = "run.json"  # {"command": "lm train"}: which verb made this folder (so --resume knows its own run)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool whose reader closed the pipe


# ------------------------------------------------------------------------------------------ options


def add_training_options(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The options every training verb takes; ``defaults`` overrides a default (``steps=1000``).

    A default left as ``None`` means "the library's default" (e.g. ``TrainConfig``'s).
    """
    d = {
        "steps": 1000,
        "batch_size": 16,
        "lr": 1e-3,
        "seed": 0,
        "device": "auto",
        "ckpt_every": 0,
        "log_every": 50,
        **defaults,
    }
    parser.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seeds model init, data order, dropout")
    parser.add_argument("--device", default=d["device"], help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--ckpt-every", type=int, default=d["ckpt_every"], help="resumable checkpoint every N steps")
    parser.add_argument("--log-every", type=int, default=d["log_every"])
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-compile", action="store_true", help="never torch.compile the model (default: on CUDA)")
    parser.add_argument(
        "--parallel",
        choices=("auto", "ddp", "fsdp"),
        default="auto",
        help="under torchrun: ddp (a replica per GPU), fsdp (weights, grads, AdamW states sharded), "
        "auto (fsdp when the training state would fill half a GPU)",
    )
    add_out_option(parser)
    add_model_options(parser)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options of every verb that builds or loads a model: ``--allow-large`` (see :func:`run_verb`)."""
    parser.add_argument(
        "--allow-large",
        action="store_true",
        help="build / load models above notelab's size bound (a guard against configs that would exhaust memory)",
    )


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the weights (and KV cache) a model runs in; auto is bf16 on CUDA, as saved elsewhere."""
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weights and KV cache (auto: bfloat16 on CUDA, else as saved)"
    )


def apply_dtype(model: Any, name: str) -> Any:
    """Cast ``model`` for ``--dtype name`` (see :func:`add_dtype_option`); returns it."""
    import torch

    if name != "auto":
        return model.to(getattr(torch, name))
    if next(model.parameters()).is_cuda:  # the fast decode paths are measured in bf16 on GPU
        return model.to(torch.bfloat16)
    return model


def add_out_option(parser: argparse.ArgumentParser, help: str = "run folder") -> None:
    """``--out DIR`` and ``--overwrite``."""
    parser.add_argument("--out", required=True, help=help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds another run")


def check_positive(**values: int | float | None) -> None:
    """One-line error for the first option (``batch_size=...``) that is given and not > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")


def check_text(option: str, text: str) -> str:
    """``text`` if it encodes as UTF-8; argv bytes that are not UTF-8 arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("utf-8", "surrogateescape")
        raise ConfigError(f"{option}: expected UTF-8 text, got the bytes {bad!r} at character {e.start}") from e
    return text


def check_training_options(args: argparse.Namespace) -> None:
    """The shared options' cheap checks (numbers, device), before any data is read or file written."""
    from notelab.core.runtime import get_device

    check_positive(steps=args.steps, batch_size=args.batch_size, lr=args.lr, log_every=args.log_every)
    if args.ckpt_every is not None and args.ckpt_every < 0:
        raise ConfigError(f"--ckpt-every: expected a number of steps >= 0 (0: only at the end), got {args.ckpt_every}")
    if args.device is not None:
        get_device(args.device)
    if getattr(args, "parallel", "auto") == "fsdp":
        from notelab.train.parallel import check_launch

        check_launch("fsdp")  # --parallel fsdp without torchrun: one line, before any data is read


def train_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields the shared options set (those given, for options defaulting to None)."""
    opts = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "ckpt_every": args.ckpt_every,
        "log_every": args.log_every,
    }
    opts = {k: v for k, v in opts.items() if v is not None}
    if args.no_compile:
        opts["compile"] = False
    if getattr(args, "parallel", None) is not None:
        opts["parallel"] = args.parallel
    return {**opts, "out_dir": str(args.out), "resume": args.resume, "progress": not args.no_progress}


# -------------------------------------------------------------------------------------- run folders


@dataclass
class RunFolder:
    """An ``--out`` folder checked by :func:`prepare_out`; ``with folder:`` wraps the work that writes it.

    ``start()`` creates it (moving a folder being overwritten aside first) and marks it as this
    verb's with run.json; ``finish(ok)`` then removes the replaced folder, or, when the work
    failed, puts it back, and removes a folder it created that holds nothing but the marker.
    """

    path: Path
    command: str  # e.g. "lm train", written to run.json
    resume: bool  # --resume of a folder that holds this verb's run
    replace: bool  # --overwrite of a folder that holds something
    created: bool = False  # start() made the folder
    launch: str | None = None  # torchrun's run id when started by torchrun with several processes
    follower: bool = False  # a rank other than 0: rank 0 checks, creates and cleans the folder

    @property
    def aside(self) -> Path:
        """Where a replaced folder waits until the new run is done."""
        return self.path.parent / f".{self.path.name}.replaced"

    def start(self) -> None:
        if self.follower:
            self._wait_for_leader()
            return
        if self.replace and self.path.exists():
            if self.aside.exists():  # left by a run killed while replacing: the older of two old runs
                shutil.rmtree(self.aside)
            os.replace(self.path, self.aside)  # atomic: the folder is the old run or the new one, never a mix
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        marker = self.path / MARKER
        if self.launch is not None:  # tells the other ranks that this launch's folder is ready
            from notelab.core.io import atomic_write_text

            atomic_write_text(marker, json.dumps({"command": self.command, "launch": self.launch}) + "\n")
        elif not marker.exists():
            marker.write_text(json.dumps({"command": self.command}) + "\n")

    def _wait_for_leader(self, timeout: float = 300.0) -> None:
        """Rank > 0: wait until rank 0 has checked and started the folder for this launch."""
        import time

        deadline = time.monotonic() + timeout
        while _read_marker(self.path).get("launch") != self.launch:
            if time.monotonic() > deadline:
                raise ConfigError(f"--out: rank 0 did not start {self.path} within {timeout:.0f} s")
            time.sleep(0.05)

    def finish(self, ok: bool, bad_input: bool = False) -> None:
        if self.follower:
            return
        if not ok and self.created and self.path.is_dir():
            names = {p.name for p in self.path.iterdir()}
            # Bad input leaves nothing behind, unless training got as far as a checkpoint to resume from.
            if names <= {MARKER} or (bad_input and "checkpoint" not in names):
                shutil.rmtree(self.path)
        if not self.replace or not self.aside.exists():
            return
        if ok:
            shutil.rmtree(self.aside)
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.aside, self.path)

    def __enter__(self) -> RunFolder:
        self.start()
        return self

    def __exit__(self, kind: type | None, *rest: Any) -> None:
        self.finish(ok=kind is None, bad_input=kind is not None and issubclass(kind, NotelabError))


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_command(path: Path) -> str | None:
    """The verb that made ``path`` (from run.json); None when unmarked or unreadable."""
    command = _read_marker(path).get("command")
    return command if isinstance(command, str) else None


def _torchrun_launch() -> tuple[int, str | None]:
    """(rank, run id) of a process torchrun started among several; (0, None) otherwise."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, None
    return int(os.environ["RANK"]), os.environ.get("TORCHELASTIC_RUN_ID", "torchrun")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_file(out: str | os.PathLike, option: str = "--out") -> Path:
    """An output file path that can be written: not a folder, its folder a folder we may write (or create)."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{option}: expected a file path, got the folder {path}")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ConfigError(f"{option}: cannot create {path}: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option}: cannot write {path}: no write permission")
    return path


def prepare_out(
    out: str | os.PathLike, command: str, *, resume: bool = False, overwrite: bool = False, option: str = "--out"
) -> RunFolder:
    """Check ``--out`` before any work; nothing is created here (see :class:`RunFolder`).

    Refused, with a one-line :class:`ConfigError`: a file; a path that cannot be created (a file
    on the way, no write permission); a non-empty folder unless ``overwrite``, or ``resume`` of a
    run made by ``command`` (marked by run.json; an unmarked folder with a ``checkpoint/`` is
    taken as a run from before the marker).

    Under ``torchrun`` with several processes only rank 0 checks and prepares the folder; it marks
    run.json with the launch's id, which the other ranks wait for before they start.
    """
    path = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: expected at most one of them, got both")
    rank, launch = _torchrun_launch()
    if rank != 0:  # under torchrun rank 0 alone checks and prepares the folder; the others wait for it
        return RunFolder(path, command, resume, replace=False, launch=launch, follower=True)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option}: expected a folder, got the file {path}")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{option}: cannot create {path}: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: cannot create or write {path}: no write permission in {base}")
    holds = path.is_dir() and any(path.iterdir())
    replace = False
    if holds:
        made_by = _run_command(path)
        if resume:
            own = made_by == command or (made_by is None and (path / "checkpoint").is_dir())
            if not own:
                what = f"a '{made_by}' run" if made_by else "files that are not a run of this command"
                raise ConfigError(f"{option} --resume: expected a '{command}' run in {path}, it holds {what}")
        elif overwrite:
            replace = True
        else:
            what = f"a '{made_by}' run" if made_by else "other files"
            raise ConfigError(
                f"{option}: {path} already holds {what}; pass --overwrite to replace it"
                + (" or --resume to continue it" if made_by == command else "")
            )
    return RunFolder(path, command, resume and holds, replace, launch=launch)


def check_same_settings(source: str | os.PathLike, saved: dict[str, Any], given: dict[str, Any]) -> None:
    """``--resume`` goes on with the settings the run was started with: one line naming the first difference."""
    for name, value in given.items():
        if saved.get(name) != value:
            raise ConfigError(
                f"--resume: {source} has {name} {saved.get(name)!r}, given {value!r}; "
                "resume with the run's settings or start a new run"
            )


def saved_step(out: str | os.PathLike) -> int | None:
    """The step of the run folder's training checkpoint (``fit``'s), or None when it has none."""
    from notelab.core.config import load_json
    from notelab.core.errors import CheckpointError
    from notelab.train import find_checkpoint

    found = find_checkpoint(out)
    if found is None:
        return None
    path = found / "trainer_state.json"
    try:
        step = load_json(path).get("step")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: expected a non-negative integer 'step', got {step!r}")
    return step


def already_complete(out: str | os.PathLike, steps: int, model_file: str = "model.safetensors") -> int | None:
    """The saved step when ``--resume`` has nothing left to do (checkpoint at >= ``steps``, model written)."""
    step = saved_step(out)
    if step is not None and step >= steps and (Path(out) / model_file).is_file():
        return step
    return None


def complete_message(command: str, step: int, steps: int) -> str:
    return (
        f"{command}: the run is already complete at {step} steps (asked for {steps}); nothing to do. "
        f"To train longer, pass a larger --steps (e.g. --steps {2 * step}) with --resume"
    )


# ------------------------------------------------------------------------------------- seed, threads


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (every device): what a model's initialisation draws from."""
    from notelab.core.runtime import seed_everything

    seed_everything(seed)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _quota_cores(quota: str | None, period: str | None) -> int | None:
    """``ceil(quota / period)`` cores from the files' text; None for no limit ("max", -1) or unreadable."""
    try:
        q, p = float(quota or "nan"), float(period or "nan")
    except ValueError:  # "max", or garbage
        return None
    if not (q > 0 and p > 0):  # also NaN
        return None
    return max(1, math.ceil(q / p))


def cgroup_cpu_limit(
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup", root: str | os.PathLike = "/sys/fs/cgroup"
) -> int | None:
    """Cores allowed by the CPU quota of this process's cgroup and its ancestors; None when unlimited.

    cgroup v2: ``cpu.max`` holds "QUOTA PERIOD" or "max PERIOD"; every level of the hierarchy
    applies, so the smallest is taken. cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in
    the ``cpu`` controller's folder (-1: no quota).
    """
    root = Path(root)
    limits: list[int | None] = []
    for line in (_read(Path(proc_cgroup)) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel_path = Path(rel.lstrip("/"))
        chain = [rel_path, *rel_path.parents]  # the cgroup, then each ancestor up to the root
        if controllers == "":  # v2 unified hierarchy
            for p in chain:
                fields = (_read(root / p / "cpu.max") or "").split()
                limits.append(_quota_cores(*fields) if len(fields) == 2 else None)
        elif "cpu" in controllers.split(","):
            for folder in (
                root / name / p for name in dict.fromkeys([controllers, "cpu", "cpu,cpuacct"]) for p in chain
            ):
                limits.append(_quota_cores(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")))
    found = [n for n in limits if n is not None]
    return min(found) if found else None


def usable_cores(
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup", root: str | os.PathLike = "/sys/fs/cgroup"
) -> int:
    """Cores this process may really use: its CPU affinity, capped by the cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(proc_cgroup, root)
    return max(1, min(cores, limit) if limit is not None else cores)


def set_threads(cores: int | None = None) -> int:
    """Cap torch's intra-op threads at ``cores`` (default :func:`usable_cores`); returns the count set.

    Only ever lowers it: torch's default (one per core it sees, or OMP_NUM_THREADS) counts cores
    a cgroup quota does not grant, and those extra threads oversubscribe the real ones.
    """
    import torch

    n = min(torch.get_num_threads(), cores if cores is not None else usable_cores())
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------- exit codes


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.strerror or type(e).__name__}: {e.filename}"
    elif isinstance(e, UnicodeError) and not isinstance(e, NotelabError):
        text = f"expected UTF-8 text: {e}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def run_verb(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a verb; expected failures become one line on stderr and exit code 2 (Ctrl-C: 130).

    With ``--allow-large`` (``args.allow_large``) the verb runs inside
    ``notelab.core.limits.allow_large_models()``: the size bound on model configs is lifted for
    every model it builds or loads.
    """
    try:
        if getattr(args, "allow_large", False):
            from notelab.core.limits import allow_large_models

            with allow_large_models(True):
                return int(func(args) or 0)
        return int(func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`notelab oad stream ... | head`): stop quietly, as a shell tool killed by
        # SIGPIPE does, and point stdout at /dev/null so the interpreter's final flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (NotelabError, OSError, UnicodeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
