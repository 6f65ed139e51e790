"""Micro-batches built by DataLoader workers, in the order the seeded data cursor decides.

Training and eval say which rows go into each micro-batch (a *plan*: lists of row indices, in order). A
torch ``DataLoader`` over that plan decodes the images and builds the tensors (``Collator.prepare``) in
``num_workers`` worker processes (0: in this process) and hands the micro-batches back in plan order,
whichever worker finishes first. What each image came to (decoded, unreadable, too large) travels back with
its micro-batch and is counted here, in the training process and in plan order (``Collator.account``): the
skip counts, ``--strict`` and the no-readable-image stop are those of a run without workers, and so is the
loss curve, since the order is the plan's, never the workers'. A checkpoint saves the cursor of the steps
taken, not of what the workers decoded ahead, so a resumed run re-plans from exactly there.
"""

from __future__ import annotations

import signal
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class MicroBatches(Dataset):
    """A map-style dataset whose keys are micro-batches: ``self[[3, 17, 5]]`` -> ``(indices, batch, outcomes)``,
    the prepared batch of rows 3, 17 and 5 (``Collator.prepare``). Training's keys are ``(epoch, index)``
    pairs, ``self[[(0, 3), (0, 17), (1, 5)]]``: the same rows, and each pair is the row's draw key for the
    collator's random choices (the T5 caption split), so they depend on the run, never on the worker."""

    def __init__(self, rows, collate):
        self.rows = rows  # a datasets.Dataset or a list of row dicts
        self.collate = collate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, samples: list) -> tuple[list[int], dict, list]:
        draws = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in samples]
        indices = [draw[-1] for draw in draws]
        batch, outcomes = self.collate.prepare([self.rows[i] for i in indices], draws)
        return indices, batch, outcomes


def _as_is(item):
    """The DataLoader's collate function: a micro-batch is already collated (by ``MicroBatches``)."""
    return item


def _worker_init(worker_id: int) -> None:  # noqa: ARG001
    """A SIGTERM sent to the whole job (Slurm's pre-emption, ``kill`` of the process group) is the training
    process's to handle: it finishes its step and saves a checkpoint. A worker killed by it would make the
    DataLoader raise in the training process instead, mid-save; workers end when the training process stops
    them, or when they see it gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def load_micro_batches(rows, collate, plan: Iterable[list[int]], num_workers: int = 0,
                       device=None) -> Iterator[tuple[list[int], dict]]:
    """``(indices, batch)`` for each micro-batch of ``plan`` (possibly endless; row indices, or ``(epoch,
    index)`` pairs: ``MicroBatches``), in plan order, the tensors on ``device``; a micro-batch with no usable
    row is ``(indices, {})``. Each one's outcomes are counted in
    ``collate.stats`` as it is handed out. Close the generator (``contextlib.closing``) to stop the workers.

    Workers start once, for the whole plan; pinned memory when the device is a GPU. The DataLoader draws its
    workers' seeds from a generator of its own, never from the global RNG (a run's dropout stream is the
    same with or without workers); what ``prepare`` draws at random (the T5 caption split) is a function of
    the run's seed and each row's draw key, never of a worker's RNG."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    pin = device.type == "cuda"
    loader = DataLoader(MicroBatches(rows, collate), batch_size=None, sampler=plan, num_workers=num_workers,
                        collate_fn=_as_is, pin_memory=pin, generator=torch.Generator(),
                        worker_init_fn=_worker_init)
    iterator = iter(loader)
    try:
        for indices, batch, outcomes in iterator:
            collate.account(outcomes)
            yield indices, {key: value.to(device, non_blocking=pin) if isinstance(value, torch.Tensor) else value
                            for key, value in batch.items()}
    finally:
        del iterator  # the last reference: its workers shut down now, not when a traceback lets go of it
