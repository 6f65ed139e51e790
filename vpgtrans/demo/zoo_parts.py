"""The parts both tiny model zoos are built from (``zoo`` = zoo-v1, ``zoo2`` = zoo-v2): model configs,
seeded models written to their directories, the build record and the staging directory a build is
installed from. Each zoo's ``_build`` calls these top to bottom; its sizes, seeds and training loops
stay in it. A part that draws random numbers seeds torch itself from the seed it is given.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LLMSpec:
    family: str  # opt | llama
    hidden_size: int
    num_layers: int
    ffn_dim: int
    num_heads: int
    steps: int  # pre-training budget, optimizer steps of 64 sequences
    lr: float


# --------------------------------------------------------------------------------------------- configs

def _padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def llm_config(spec: LLMSpec, tokenizer, max_positions: int = 64):
    """An OPT or LLaMA config sized by ``spec``, its vocabulary fitted to ``tokenizer``."""
    from transformers import LlamaConfig, OPTConfig

    if spec.family == "opt":  # one spare row at least, for a source model's <image> token
        return OPTConfig(vocab_size=_padded(len(tokenizer) + 1), hidden_size=spec.hidden_size,
                         word_embed_proj_dim=spec.hidden_size, num_hidden_layers=spec.num_layers,
                         ffn_dim=spec.ffn_dim, num_attention_heads=spec.num_heads, max_position_embeddings=max_positions,
                         dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                       intermediate_size=spec.ffn_dim, num_attention_heads=spec.num_heads,
                       num_key_value_heads=spec.num_heads, max_position_embeddings=max_positions, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def source_config(vision_config, text_config, image_token_id: int, newline_id: int, num_query_tokens: int,
                  qformer: dict):
    """BLIP-2 = tiny ViT + the ``qformer`` Q-Former + ``num_query_tokens`` queries + the text model.
    Like the HF BLIP-2 OPT checkpoints, the text config's EOS is "\\n", where generation stops."""
    from transformers import Blip2Config

    text = text_config.to_dict()
    text["eos_token_id"] = newline_id
    qformer = dict(qformer, encoder_hidden_size=vision_config.hidden_size)
    return Blip2Config(vision_config=vision_config.to_dict(), qformer_config=qformer, text_config=text,
                       num_query_tokens=num_query_tokens, image_token_index=image_token_id)


def source_tokenizer(opt_tokenizer):
    """The OPT tokenizer plus the ``<image>`` placeholder HF BLIP-2 expects K times in ``input_ids``;
    left padding, for batched generation."""
    tokenizer = copy.deepcopy(opt_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: saved with it
    return tokenizer


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- parts

def train_tokenizers(corpus: list[str]) -> dict:
    """The OPT-style and the LLaMA-style tokenizer, both trained on ``corpus``; keyed by family."""
    from vpgtrans.demo import vocab

    return {"opt": vocab.train_opt_tokenizer(corpus), "llama": vocab.train_llama_tokenizer(corpus)}


def build_llm(out_dir: Path, spec: LLMSpec, tokenizer, seed: int, max_positions: int = 64,
              pairs: list[tuple[str, str]] | None = None, eval_pairs: list[tuple[str, str]] | None = None,
              copy_accuracy=None):
    """A causal LM sized by ``spec`` (initialised from ``seed``), pre-trained on ``pairs`` when given,
    saved with its tokenizer to ``out_dir``. Returns (model, metrics): after pre-training, the final
    loss and the copy accuracy on ``eval_pairs`` (``copy_accuracy(model, tokenizer, eval_pairs)``, default
    ``pretrain.lm_copy_accuracy``); else no metrics."""
    import torch
    from transformers import AutoModelForCausalLM

    from vpgtrans.demo import pretrain

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llm_config(spec, tokenizer, max_positions))
    metrics = {}
    if pairs is not None:
        loss = pretrain.pretrain_lm(model, tokenizer, pairs, spec.steps, lr=spec.lr, seed=seed)
        copy_accuracy = (copy_accuracy or pretrain.lm_copy_accuracy)(model, tokenizer, eval_pairs)
        metrics = {"final_loss": round(loss, 4), "copy_accuracy": round(copy_accuracy, 4)}
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, metrics


def new_vision(settings: dict, seed: int):
    """A randomly initialised ``Blip2VisionModel`` with config ``settings``, initialised from ``seed``."""
    import torch
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(seed)
    return Blip2VisionModel(Blip2VisionConfig(**settings))


def save_vision(out_dir: Path, vision, image_processor) -> None:
    vision.eval()
    vision.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)


def new_source(vision, llm, tokenizer, seed: int, num_query_tokens: int, qformer: dict):
    """An HF BLIP-2 holding ``vision`` and ``llm`` weight for weight (``tokenizer``: ``source_tokenizer``'s),
    its Q-Former and projector initialised from ``seed`` and its queries drawn from ``seed + 1``."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    newline_id = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = source_config(vision.config, llm.config, image_token_id, newline_id, num_query_tokens, qformer)
    torch.manual_seed(seed)
    source = Blip2ForConditionalGeneration(config)
    source.vision_model.load_state_dict(vision.state_dict())
    source.language_model.load_state_dict(llm.state_dict())
    with torch.no_grad():  # HF initialises the queries to zeros: a dead VPG
        source.query_tokens.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed + 1))
    return source


def save_source(out_dir: Path, source, image_processor, tokenizer) -> None:
    """The model and its ``Blip2Processor``, so the directory loads with ``transformers`` alone."""
    from transformers import Blip2Processor

    source.eval()
    source.save_pretrained(out_dir)
    Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                   num_query_tokens=source.config.num_query_tokens).save_pretrained(out_dir)


def source_example(tokenizer, task: str, target: str, question: str | None, num_query_tokens: int,
                   image_token_id: int) -> tuple[list[int], list[int]]:
    """One source-model training example in HF BLIP-2's text format: (input_ids with the model's own
    ``<image>`` token x K where vpgtrans puts its image slots, labels)."""
    from vpgtrans.config import PromptTemplate
    from vpgtrans.model.vlm import IMAGE_TOKEN_ID
    from vpgtrans.prompting import training_example

    ex = training_example(tokenizer, PromptTemplate(), task, num_query_tokens, target, question)
    return [image_token_id if t == IMAGE_TOKEN_ID else t for t in ex["input_ids"]], ex["labels"]


# ---------------------------------------------------------------------------------------------- build

def stopwatch(seconds: dict, log, prefix: str):
    """``lap(name)``: stores the seconds since the previous lap in ``seconds[name]`` and logs them."""
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 2)
        log(f"{prefix}: {name} done in {seconds[name]:.1f}s")
        clock = time.perf_counter()

    return lap


@contextlib.contextmanager
def quiet(threads: int):
    """torch on ``threads`` threads, transformers' per-model warnings and progress bars off; all restored."""
    import torch
    from transformers.utils import logging as hf_logging

    saved_threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    progress_bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        hf_logging.set_verbosity(verbosity)
        if progress_bars:
            hf_logging.enable_progress_bar()


def write_record(root: Path, record: dict, started: float, paths: dict[str, Path]) -> None:
    """``root/zoo.json``: ``record`` plus the build time, library versions and ``paths`` relative to ``root``."""
    import tokenizers
    import torch
    import transformers

    record["build_seconds"] = round(time.perf_counter() - started, 1)
    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "tokenizers": tokenizers.__version__}
    record["paths"] = {k: str(p.relative_to(root)) for k, p in paths.items() if k != "root"}
    (root / "zoo.json").write_text(json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def staging_dir(root: Path):
    """A fresh temporary directory beside ``root`` to build in, removed afterwards (once installed, it is gone)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-building-", dir=root.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_part(out: Path, record_name: str, settings: dict, build, log=None) -> tuple[Path, dict]:
    """A part built beside a zoo on first use (a stage-1 Q-Former, an extra target LLM) and reused while the
    ``settings`` in its record ``out/record_name`` are ``settings``: a changed recipe rebuilds it.
    ``build(tmp)`` writes the part into a fresh staging directory and returns the rest of its record; the
    record (``settings``, what ``build`` returned, ``seconds``) goes beside it and the directory replaces
    ``out`` in one rename. Returns (out, record)."""
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples are lists
    record_file = out / record_name
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == settings:
            return out, record
    started = time.perf_counter()
    with staging_dir(out) as tmp:
        record = {"settings": settings, **build(tmp)}
        record["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / record_name).write_text(json.dumps(record, indent=2) + "\n")
        install(tmp, out, replace=True, is_complete=lambda path: (path / record_name).is_file())
    if log is not None:
        log(f"{out.name}: built in {record['seconds']:.0f}s")
    return out, record


def install(tmp: Path, root: Path, replace: bool, is_complete) -> None:
    """Atomically move the finished build ``tmp`` to ``root``; ``is_complete(root)`` tells a finished zoo."""
    if root.exists():
        if is_complete(root) and not replace:
            return  # a concurrent build finished first; keep it
        old = root.with_name(f".{root.name}-old-{os.getpid()}")
        os.rename(root, old)
        try:
            os.rename(tmp, root)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, root)
    except OSError:
        if not is_complete(root):
            raise
