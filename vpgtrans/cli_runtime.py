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
    """A rich progress bar (samples/s, ETA) as a callback for the training loop."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}")]
    if batch_size:
        columns.append(TextColumn("{task.fields[rate]:.1f} samples/s"))
    progress = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err_console(), transient=True)
    state = {"task": None}

    def update(done: int, total: int, loss: float) -> None:
        if state["task"] is None:  # (a resumed run starts at its checkpoint's step)
            progress.start()
            state.update(task=progress.add_task(description, total=total, loss=loss, rate=0.0, completed=done - 1),
                         first=(time.time(), done))
        seconds, steps = time.time() - state["first"][0], done - state["first"][1]
        rate = steps * (batch_size or 0) / seconds if seconds > 0 else 0.0
        progress.update(state["task"], completed=done, loss=loss, rate=rate, refresh=True)
        if done == total:
            progress.stop()
            state["task"] = None

    return update


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
