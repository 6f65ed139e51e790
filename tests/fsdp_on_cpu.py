"""``python tests/fsdp_on_cpu.py ARGS`` = ``vpgtrans ARGS`` with accelerate's FSDP switched on for CPU
processes, so the FSDP2 path (accelerate's ``fsdp2_prepare_model`` -> ``fully_shard`` over gloo) runs
on this GPU-less machine under ``torchrun``.

accelerate turns ``ACCELERATE_USE_FSDP`` into FSDP only for GPU-like devices and silently runs DDP on
CPU processes; this lifts that one gate (after accelerate has set everything else up) and nothing
else. Used by tests/test_fsdp.py only.

``VPGTRANS_TEST_STOP_AT_STEP=N`` makes every process act as if SIGTERM had arrived during step N (the
stop agreed on at the end of each step returns true at the N-th step), to test the save-and-stop path
at a known step.
"""

from __future__ import annotations

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does for GPUs


AcceleratorState.__init__ = _init_with_fsdp_on_cpu


def _stop_at_step(step: int) -> None:
    from vpgtrans.stages import train

    calls = {"n": 0}
    agree = train._any_process

    def any_process(accelerator, flag: bool) -> bool:
        calls["n"] += 1
        return agree(accelerator, flag or calls["n"] == step)

    train._any_process = any_process


if os.environ.get("VPGTRANS_TEST_STOP_AT_STEP"):
    _stop_at_step(int(os.environ["VPGTRANS_TEST_STOP_AT_STEP"]))

if __name__ == "__main__":
    from vpgtrans.cli import main

    sys.exit(main())
