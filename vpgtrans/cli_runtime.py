"""Process-level plumbing of the command line: library noise, logging, progress bars, and ending a
``torchrun`` / ``accelerate launch`` process cleanly. Imported by ``vpgtrans.cli`` only; nothing here
imports torch at module level (``--help`` stays instant)."""

from __future__ import annotations

import logging
import os

import typer


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(show_path=False, console=err_console())], force=True)
    # Under torchrun every process logs the same progress: only rank 0 does, the others report errors.
    level = (logging.INFO if verbose else logging.WARNING) if is_main_process() else logging.ERROR
    logging.getLogger("vpgtrans").setLevel(level)


def err_console():
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(description: str, batch_size: int | None = None):
    """A progress callback ``(done, total, loss=None, lr=None)`` for the training loop (and evaluation,
    without a loss): a rich bar (samples/s, ETA) on a terminal; plain log lines when stderr is not one (a
    batch job's log file), see ``plain_progress``."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = err_console()
    if not console.is_terminal:
        return plain_progress(description, batch_size)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[loss]}")]
    if batch_size:
        columns.append(TextColumn("{task.fields[rate]:.1f} samples/s"))
    progress = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    state = {"task": None}

    def update(done: int, total: int, loss: float | None = None, lr: float | None = None) -> None:
        shown = "" if loss is None else f"loss {loss:.4f}"
        if state["task"] is None:  # (a resumed run starts at its checkpoint's step)
            progress.start()
            state.update(task=progress.add_task(description, total=total, loss=shown, rate=0.0, completed=done - 1),
                         first=(time.time(), done))
        seconds, steps = time.time() - state["first"][0], done - state["first"][1]
        rate = steps * (batch_size or 0) / seconds if seconds > 0 else 0.0
        progress.update(state["task"], completed=done, loss=shown, rate=rate, refresh=True)
        if done == total:
            progress.stop()
            state["task"] = None

    return update


PROGRESS_SECONDS = "VPGTRANS_PROGRESS_SECONDS"  # seconds between plain progress lines (default 30)


def plain_progress(description: str, batch_size: int | None = None, every_seconds: float | None = None,
                   write=None, clock=None):
    """Progress for batch-job logs: one plain line on the first step, then at most one every
    ``every_seconds`` (``$VPGTRANS_PROGRESS_SECONDS``, default 30), and on the last step::

        warmup: step 120/1000 (12%) loss 2.3410 lr 5.00e-04 41.3 samples/s elapsed 0:04:51 eta 0:35:30
    """
    import sys
    import time

    if every_seconds is None:
        every_seconds = float(os.environ.get(PROGRESS_SECONDS, "30"))
    write = write or (lambda line: print(line, file=sys.stderr, flush=True))
    clock = clock or time.monotonic
    state: dict = {}

    def update(done: int, total: int, loss: float | None = None, lr: float | None = None) -> None:
        now = clock()
        if "start" not in state:  # the clock starts at the end of the first step seen (a resumed run's too)
            state.update(start=(now, done), last=None)
        if state["last"] is not None and now - state["last"] < every_seconds and done != total:
            return
        state["last"] = now
        seconds, steps = now - state["start"][0], done - state["start"][1]
        per_step = seconds / steps if steps > 0 else 0.0
        parts = [f"{description}: step {done}/{total} ({100 * done // max(total, 1)}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if batch_size and seconds > 0:
            parts.append(f"{steps * batch_size / seconds:.1f} samples/s")
        parts += [f"elapsed {_clock(seconds)}", f"eta {_clock(per_step * (total - done)) if steps > 0 and seconds > 0 else '?'}"]
        write(" ".join(parts))

    return update


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def is_main_process() -> bool:
    """Under torchrun / accelerate launch every process runs the command; only rank 0 prints."""
    return os.environ.get("RANK", "0") == "0"


def until_stopped(run, *args, **kwargs):
    """Run a training function; a SIGTERM stop (checkpoint saved) exits with 143 = 128 + SIGTERM."""
    from vpgtrans.training import TrainingInterrupted

    finished = False
    try:
        result = run(*args, **kwargs)
        finished = True
        return result
    except TrainingInterrupted as exc:
        if is_main_process():
            typer.echo(f"stopped: {exc}", err=True)
        finished = True  # every process stops at the same step (the stop is agreed on), so all get here
        raise typer.Exit(143) from None
    finally:
        leave_process_group(synchronise=finished)


def leave_process_group(synchronise: bool) -> None:
    """Under torchrun: shut the process group down before exiting. A process that exits while another
    still talks to it can abort in gloo's destructor ("terminate called without an active exception"),
    so when every process is known to get here, they first meet at a barrier. (On an error in one
    process a barrier could hang: then just leave.)"""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()
