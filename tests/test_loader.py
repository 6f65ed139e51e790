"""DataLoader workers (``--num-workers``): the same run as without them, and exact resume.

Workers decode images ahead of the step that uses them; the order is the seeded cursor's, the skip counts
come back from the workers and are counted in the training process, so a run with workers gives the same
loss curve, eval curve, weights and data counts as one without, and a run interrupted mid-epoch resumes to
the same end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import StopHere, assert_curves_close, stop_at
from test_bad_data import png_bytes
from test_cli import _user_error  # exit 2, one "error: ..." line, no traceback
from vpgtrans.bundle import CONNECTOR_FILE, MANIFEST, VPG_FILE, read_manifest
from vpgtrans.checkpoint import list_checkpoints, read_state
from vpgtrans.cli import app
from vpgtrans.config import TrainConfig
from vpgtrans.errors import VpgtransError
from vpgtrans.evaluate import evaluate
from vpgtrans.stages import train as train_module
from vpgtrans.training import RunOptions, TrainingInterrupted

# As tests/test_resume.py: dropout in the trained Q-Former, 2 micro-batches per step, an eval curve, and
# 8 x 4 = 32 samples > 24 rows (the run crosses into the second epoch's order).
FINETUNE = dict(max_steps=8, batch_size=4, grad_accum=2, eval_every=3, eval_max_samples=4, max_new_tokens=2, log_every=1)


def _records(bundle, kind):
    return [r for r in map(json.loads, (bundle / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _assert_same_run(ours, theirs):
    """The same loss curve (1e-6), eval curve, trained weights and data counts."""
    ours_train, theirs_train = _records(ours, "train"), _records(theirs, "train")
    assert len(ours_train) == len(theirs_train) == 8
    assert_curves_close([{k: r[k] for k in ("step", "samples", "epoch", "loss", "lr")} for r in ours_train],
                        [{k: r[k] for k in ("step", "samples", "epoch", "loss", "lr")} for r in theirs_train])
    assert_curves_close(read_manifest(ours)["curve"], read_manifest(theirs)["curve"])
    assert len(read_manifest(ours)["curve"]) == 4  # steps 0, 3, 6, 8
    for name in (VPG_FILE, CONNECTOR_FILE):
        x, y = load_file(str(ours / name)), load_file(str(theirs / name))
        assert set(x) == set(y)
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6, msg=f"{name}:{key}")
    assert read_manifest(ours)["data"] == read_manifest(theirs)["data"]


@pytest.fixture(scope="module")
def no_workers(inherited, tiny, tmp_path_factory):
    """The uninterrupted run without workers, to compare with."""
    out = tmp_path_factory.mktemp("no-workers") / "finetune"
    return train_module.finetune(inherited, tiny["caption"], out, TrainConfig.finetune(**FINETUNE),
                                 eval_data=tiny["caption"])


def test_two_workers_give_the_run_of_none(no_workers, inherited, tiny, tmp_path):
    result = train_module.finetune(inherited, tiny["caption"], tmp_path / "w2", TrainConfig.finetune(**FINETUNE),
                                   eval_data=tiny["caption"], options=RunOptions(num_workers=2))
    _assert_same_run(result, no_workers)
    assert read_manifest(result)["config"]["run"]["num_workers"] == 2
    assert multiprocessing.active_children() == []  # the workers are gone with the run


def test_interrupted_mid_epoch_with_workers_resumes_to_the_same_run(no_workers, inherited, tiny, tmp_path):
    config, out = TrainConfig.finetune(**FINETUNE), tmp_path / "run"
    with pytest.raises(StopHere):
        train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                              progress=stop_at(5), options=RunOptions(save_every=2, num_workers=2))
    assert multiprocessing.active_children() == []  # an exception out of the loop stops the workers too
    checkpoint = list_checkpoints(out)[-1]
    # Step 4 of 6 per epoch: the cursor is the steps', not the batches the workers had decoded ahead.
    assert read_state(checkpoint)["position"] == {"epoch": 0, "cursor": 16}
    result = train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                                   options=RunOptions(save_every=2, resume=True, num_workers=2))
    _assert_same_run(result, no_workers)


def test_sigterm_to_the_job_with_workers_saves_and_resumes(no_workers, inherited, tiny, tmp_path):
    """Slurm signals every process of the job. The training process finishes its step before it stops, and
    may need batches from the workers for that: they must leave the stopping to it."""
    def terminate(done, steps, loss, lr):
        if done == 3:  # the workers get the job's SIGTERM first; steps 5 and 6 are not decoded yet
            workers = multiprocessing.active_children()
            assert len(workers) == 2
            for worker in workers:
                os.kill(worker.pid, signal.SIGTERM)
        if done == 6:  # ... the training process notices its own at the end of a later step
            os.kill(os.getpid(), signal.SIGTERM)

    config, out = TrainConfig.finetune(**FINETUNE), tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="after step 6/8"):
        train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                              progress=terminate, options=RunOptions(num_workers=2))
    assert [p.name for p in list_checkpoints(out)] == ["step-000006"]
    result = train_module.finetune(inherited, tiny["caption"], out, config, eval_data=tiny["caption"],
                                   options=RunOptions(resume=True, num_workers=2))
    _assert_same_run(result, no_workers)


# --- bad images: counted the same, wherever they were decoded -----------------------------------------

@pytest.fixture()
def bad_images(tiny, tmp_path):
    """The tiny caption data plus two unreadable images and one too large: 27 rows."""
    root = tmp_path / "bad-images"
    (root / "images").mkdir(parents=True)
    rows = [json.loads(line) for line in (tiny["caption"] / "data.jsonl").read_text().splitlines()]
    for row in rows:
        (root / row["image"]).write_bytes((tiny["caption"] / row["image"]).read_bytes())
    (root / "images" / "garbage.png").write_bytes(b"not an image")
    (root / "images" / "cut.png").write_bytes((root / rows[0]["image"]).read_bytes()[:40])
    (root / "images" / "bomb.png").write_bytes(png_bytes(100_000, 100_000, 8, 0))  # over MAX_IMAGE_PIXELS
    rows += [{"image": f"images/{name}.png", "caption": "a thing"} for name in ("garbage", "cut", "bomb")]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_skip_counts_come_back_from_the_workers(inherited, bad_images, tmp_path):
    # 2 steps of 27 = two whole epochs: every bad image is met twice and counted once.
    config = TrainConfig.warmup(max_steps=2, batch_size=27, grad_accum=3)
    runs = {workers: train_module.warmup_projector(inherited, bad_images, tmp_path / f"w{workers}", config,
                                                   options=RunOptions(num_workers=workers)) for workers in (0, 2)}
    counts = {workers: read_manifest(path)["data"] for workers, path in runs.items()}
    assert counts[2] == counts[0]
    assert (counts[2]["rows"], counts[2]["skipped_unreadable_image"], counts[2]["skipped_large_image"]) == (27, 2, 1)
    assert sorted(p.split(": ")[0].rsplit("/", 1)[-1] for p in counts[2]["problems"]) == ["bomb.png", "cut.png",
                                                                                           "garbage.png"]
    losses = {workers: [r["loss"] for r in _records(path, "train")] for workers, path in runs.items()}
    assert losses[2] == pytest.approx(losses[0], abs=1e-6)


def test_strict_with_workers_is_one_line_naming_the_image(inherited, bad_images, tmp_path):
    result = CliRunner().invoke(app, ["warmup-projector", str(inherited), "--data", str(bad_images), "--out",
                                      str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "27", "--strict",
                                      "--num-workers", "2"])
    _user_error(result, "unreadable image", "--strict")
    assert any(name in result.stderr for name in ("garbage.png", "cut.png"))
    assert not (tmp_path / "o" / MANIFEST).exists()


def test_negative_workers_are_refused(inherited, tiny, tmp_path):
    for command in (["warmup-projector", str(inherited), "--out", str(tmp_path / "o")], ["eval", str(inherited)]):
        result = CliRunner().invoke(app, [*command, "--data", str(tiny["caption"]), "--num-workers", "-1"])
        _user_error(result, "--num-workers must be >= 0 (got -1)")
    assert not (tmp_path / "o").exists()
    with pytest.raises(VpgtransError, match="--num-workers"):
        RunOptions(num_workers=-2)


def test_eval_with_workers_scores_what_eval_without_does(inherited, bad_images, tmp_path, monkeypatch):
    """The same predictions, references and counts; the unreadable rows are left out in both; the workers
    asked for are the ones the loader gets."""
    import vpgtrans.evaluate as evaluate_module

    asked = []
    real = evaluate_module.load_micro_batches
    monkeypatch.setattr(evaluate_module, "load_micro_batches",
                        lambda rows, collate, plan, workers, device: asked.append(workers) or real(rows, collate, plan,
                                                                                                   workers, device))
    reports = {workers: evaluate(inherited, bad_images, batch_size=5, max_new_tokens=3, num_workers=workers,
                                 out=tmp_path / f"eval-{workers}.json") for workers in (0, 2)}
    assert asked == [0, 2]
    assert reports[2]["scores"] == reports[0]["scores"]
    assert reports[2]["data_stats"] == reports[0]["data_stats"]
    assert reports[2]["data_stats"]["skipped_unreadable_image"] == 2
    samples = {workers: json.loads((tmp_path / f"eval-{workers}.json").read_text())["samples"] for workers in (0, 2)}
    assert samples[2] == samples[0] and len(samples[2]) == 24  # one per readable image


def test_two_processes_with_a_worker_each_equal_one_process_without(inherited, tiny, tmp_path):
    """torchrun, 2 processes (gloo), each with its own worker decoding its own share of every global batch,
    against 1 process decoding everything itself: the same update (2 micro-batches a step, uneven split)."""
    from test_distributed import _assert_close_weights, _console_script, _run

    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", _console_script(),
            "warmup-projector", str(inherited), "--data", str(tiny["caption"]), "--out", str(tmp_path / "two"),
            "--max-steps", "3", "--batch-size", "6", "--grad-accum", "2", "--num-workers", "1"]
    done = _run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train_module.warmup_projector(inherited, tiny["caption"], tmp_path / "one",
                                        TrainConfig.warmup(max_steps=3, batch_size=6, grad_accum=2))
    two = tmp_path / "two"
    assert read_manifest(two)["config"]["num_processes"] == 2 and read_manifest(two)["config"]["run"]["num_workers"] == 1
    _assert_close_weights(one, two)
    assert [r["loss"] for r in _records(two, "train")] == pytest.approx([r["loss"] for r in _records(one, "train")],
                                                                        abs=1e-6)


def test_loader_benchmark_smoke(tmp_path):
    """The benchmark runs and reports a rate for each setting, on JPEG images of the size asked for."""
    from PIL import Image

    from benchmarks import loader

    data = loader.make_data(tmp_path / "data", rows=3, image_px=48)
    rows = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    with Image.open(data / rows[0]["image"]) as image:
        assert (image.format, image.size) == ("JPEG", (48, 48))
    result = loader.main(["--smoke", "--json", str(tmp_path / "loader.json")])
    assert [run["num_workers"] for run in result["runs"]] == [0, 2]
    assert all(run["steps_per_second"] > 0 for run in result["runs"])
    assert json.loads((tmp_path / "loader.json").read_text())["median_steps_per_second"].keys() == {"0", "2"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_workers_on_a_gpu_hand_out_cuda_batches_and_the_same_run(inherited, tiny, tmp_path):
    from transformers import AutoTokenizer

    from vpgtrans.collate import Collator
    from vpgtrans.config import PromptTemplate
    from vpgtrans.data import load_rows
    from vpgtrans.images import build_image_processor
    from vpgtrans.loader import load_micro_batches

    rows, _, stats = load_rows(tiny["caption"])
    collate = Collator(AutoTokenizer.from_pretrained(tiny["llama"]), PromptTemplate(), "caption", 4,
                       build_image_processor(32), False, stats=stats)
    loaded = load_micro_batches(rows, collate, [[0, 1], [2, 3]], num_workers=2, device="cuda")
    assert [(indices, batch["pixel_values"].device.type) for indices, batch in loaded] == [([0, 1], "cuda"),
                                                                                          ([2, 3], "cuda")]
    config = TrainConfig.finetune(max_steps=4, batch_size=4, grad_accum=2, log_every=1)
    runs = {workers: train_module.finetune(inherited, tiny["caption"], tmp_path / f"w{workers}", config,
                                           options=RunOptions(num_workers=workers)) for workers in (0, 2)}
    # (CUDA kernels may sum in another order from run to run: 1e-5, not bit equality.)
    assert [r["loss"] for r in _records(runs[2], "train")] == pytest.approx(
        [r["loss"] for r in _records(runs[0], "train")], abs=1e-5)
