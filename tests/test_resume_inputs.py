"""--resume checks contents, not only paths: data or an input bundle changed in place, or a transfer resumed
with another target LLM, is refused in one line instead of being used silently."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import StopHere, stop_at
from vpgtrans.config import InheritConfig, TrainConfig
from vpgtrans.errors import VpgtransError
from vpgtrans.stages import train as train_module
from vpgtrans.stages.inherit import inherit
from vpgtrans.stages.transfer import transfer
from vpgtrans.training import RunOptions

CONFIG = dict(max_steps=4, batch_size=4)




def _edit_first_caption(data_dir):
    rows = [json.loads(line) for line in (data_dir / "data.jsonl").read_text().splitlines()]
    rows[0]["caption"] = "a completely different caption"
    (data_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_resume_refuses_data_changed_in_place(inherited, tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["caption"], data)
    out, config = tmp_path / "run", TrainConfig.warmup(**CONFIG)
    with pytest.raises(StopHere):
        train_module.warmup_projector(inherited, data, out, config, progress=stop_at(3),
                                      options=RunOptions(save_every=2))
    _edit_first_caption(data)
    with pytest.raises(VpgtransError, match=r"step-000002: was made with a different data \(its rows changed\)"):
        train_module.warmup_projector(inherited, data, out, config, options=RunOptions(save_every=2, resume=True))


def test_resume_of_a_finished_run_refuses_other_contents(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["caption"], data)
    bundle = inherit(tiny["source"], tiny["llama"], tmp_path / "inherit")
    out, config = tmp_path / "run", TrainConfig.warmup(**CONFIG)
    train_module.warmup_projector(bundle, data, out, config)
    # The same call again: the finished run is returned as it is.
    assert train_module.warmup_projector(bundle, data, out, config, options=RunOptions(resume=True)) == out
    _edit_first_caption(data)
    with pytest.raises(VpgtransError, match=r"holds a finished run made with a different data \(its rows changed\)"):
        train_module.warmup_projector(bundle, data, out, config, options=RunOptions(resume=True))
    shutil.copytree(tiny["caption"], data, dirs_exist_ok=True)  # the data back as it was
    # The same path, a bundle with other weights (a re-run with the same settings is byte-identical but for its
    # timestamp, which may fall in the same second: that one is the same content, rightly accepted).
    inherit(tiny["source"], tiny["llama"], bundle, InheritConfig(ridge=0.5), force=True)
    with pytest.raises(VpgtransError, match=r"different input bundle \(its content changed\)"):
        train_module.warmup_projector(bundle, data, out, config, options=RunOptions(resume=True))


def test_transfer_resume_refuses_another_target_llm(tiny, tmp_path):
    out = tmp_path / "transfer"
    common = dict(warmup_config=TrainConfig.warmup(**CONFIG), finetune_config=TrainConfig.finetune(**CONFIG))
    with pytest.raises(StopHere):
        transfer(tiny["source"], tiny["llama"], tiny["caption"], out, progress=stop_at(3), **common,
                 options=RunOptions(save_every=2))
    with pytest.raises(VpgtransError, match="inherit: was made with a different --target-llm than this call"):
        transfer(tiny["source"], tiny["opt"], tiny["caption"], out, **common, options=RunOptions(resume=True))
    with pytest.raises(VpgtransError, match="different inherit settings"):
        from vpgtrans.config import InheritConfig

        transfer(tiny["source"], tiny["llama"], tiny["caption"], out, **common, options=RunOptions(resume=True),
                 inherit_config=InheritConfig(ridge=0.5))
    summary = transfer(tiny["source"], tiny["llama"], tiny["caption"], out, **common, options=RunOptions(resume=True))
    assert list(summary["stages"]) == ["inherit", "warmup", "finetune"]
