"""The ``vpgtrans`` command line: a thin Typer layer over the library.

Each command parses options, builds a config, calls one library function and prints where the result
went. Heavy imports (torch, transformers) happen inside the commands so ``--help`` is instant. Any
``VpgtransError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from vpgtrans.cli_commands import Command, ConfigCommand, Group, config_note, one_line
from vpgtrans.cli_data import build_data_app
from vpgtrans.cli_runtime import (err_console, is_main_process, progress_bar, quiet_libraries, setup_logging,
                                  until_stopped)
from vpgtrans.config import CHOICE_ANSWERS, CONVERTERS, T5_CAPTION_SPLITS, TEMPLATES
from vpgtrans.data import TASKS
from vpgtrans.errors import VpgtransError
from vpgtrans.recipes import RECIPES
from vpgtrans.refexp import BBOX_FORMATS

# Options whose value is one of a fixed set: the choices show in --help and complete in the shell, and any
# other value is one line before anything runs. The registries above are torch-free and used as they are;
# these are spelled out (their modules import torch) and tests/test_config_file.py checks them against it.
DTYPES = ("fp32", "bf16", "fp16")  # vpgtrans.training.DTYPES
REPORT_TO = ("none", "tensorboard", "wandb")  # vpgtrans.training.REPORT_TO
# Connectors and recipes are registries Python code may extend (a connector registered in a script runs
# through the CLI): the built-in names are shown and completed, and the library checks the value.
CONNECTORS = ("linear", "infmllm", "plora", "lavin", "lavin-llm")  # vpgtrans.model.connectors.CONNECTORS
CAPTION_TOKENIZERS = ("regex", "ptb")  # vpgtrans.metrics.CAPTION_TOKENIZERS
CHOICE_SCORING = ("generate", "likelihood")  # vpgtrans.evaluate.CHOICE_SCORING
EXPORT_FORMATS = ("hf", "lavis", "adapter")  # vpgtrans.export.EXPORTERS
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies

app = typer.Typer(help="Move a visual prompt generator (VPG) from one multimodal LLM to another LLM (VPGTrans).",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=Group)


def _print_version(value: bool) -> None:
    if value:
        from vpgtrans import __version__

        typer.echo(f"vpgtrans {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Move a visual prompt generator (VPG) from one multimodal LLM to another LLM (VPGTrans)."""


def cli_command(func):
    """Register a command whose user-facing errors become one line + exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except VpgtransError as exc:
            # One line, always: a newline inside a user's file name or key must not split the message.
            typer.echo(f"error: {one_line(str(exc) + config_note(str(exc)))}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # what the library did not name itself (a disk failing mid-write, ...)
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc}".replace("\n", "\\n"), err=True)
            raise typer.Exit(2) from None

    return wrapper


def command(name: str | None = None, config: bool = False):
    """Register a command; ``config``: it also takes ``--config FILE`` and ``--print-config``."""

    def register(func):
        return app.command(name, cls=ConfigCommand if config else Command)(cli_command(func))

    return register


# Options shared by the training commands ------------------------------------------------------------
MaxSteps = Annotated[Optional[int], typer.Option(help="Budget in optimizer steps (overrides --epochs).")]
MaxSamples = Annotated[Optional[int], typer.Option(help="Budget in training samples (overrides --epochs).")]
Epochs = Annotated[Optional[float], typer.Option(help="Budget in passes over the data (default 1).")]
BatchSize = Annotated[int, typer.Option(help="Global batch size (all processes, all accumulation steps).")]
GradAccum = Annotated[int, typer.Option(help="Gradient accumulation steps.")]
Seed = Annotated[int, typer.Option(help="Seed for initialisation and data order.")]
Lr = Annotated[Optional[float], typer.Option(help="Learning rate (default: the stage's recipe).")]
EvalData = Annotated[Optional[Path], typer.Option(help="Data to evaluate on during training.")]
EvalEvery = Annotated[Optional[int], typer.Option(help="Evaluate every N optimizer steps (needs --eval-data).")]
Force = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")]
Strict = Annotated[bool, typer.Option("--strict", help="Stop at the first bad data row or unreadable image "
                                                      "(default: skip it and count it in the manifest).")]
BboxFormat = Annotated[Literal[BBOX_FORMATS], typer.Option(help="Pixel boxes of RefCOCO-style rows (image, expression, bbox): xyxy "
                                              "corners or xywh (RefCOCO's own files).")]
ImageRoot = Annotated[Optional[Path], typer.Option(help="Where relative image paths start (default: the .jsonl's directory; "
                                                     "a LAVIS .json: LAVIS's ../images, else its directory).")]
DataSplit = Annotated[Optional[str], typer.Option(help="Split of a datasets name (or NAME:SPLIT), a DatasetDict directory or "
                                                   "an imagefolder with split directories (default train).")]
DataColumns = Annotated[Optional[str], typer.Option(help="Read the data's own keys / columns as ours: OURS=THEIRS,... "
                                                       "(e.g. caption=text,image=img).")]
SaveEvery = Annotated[Optional[int], typer.Option(help="Checkpoint every N optimizer steps under OUT/checkpoints/.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint under --out.")]
SkipNonfinite = Annotated[int, typer.Option(help="Skip up to N batches with a non-finite loss (default: stop).")]
Dtype = Annotated[Optional[Literal[DTYPES]], typer.Option(help="Mixed precision and frozen-weight dtype "
                                                   "(default: the accelerate launch config, else fp32).")]
VisionDtype = Annotated[Optional[Literal[DTYPES]], typer.Option(
    help="The frozen ViT's weights and compute (default: as --dtype). bf16/fp16 halve its memory next to a "
         "--load-in-8bit/4bit LLM; LAVIS runs BLIP-2's ViT in fp16.")]
LoadIn8bit = Annotated[bool, typer.Option("--load-in-8bit", help="Load the frozen LLM in 8-bit (bitsandbytes).")]
LoadIn4bit = Annotated[bool, typer.Option("--load-in-4bit", help="Load the frozen LLM in 4-bit NF4 (bitsandbytes).")]
GradCkpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute LLM activations in backward.")]
ReportTo = Annotated[Literal[REPORT_TO], typer.Option(help="Log to a tracker (through accelerate's).")]
T5CaptionSplit = Annotated[Literal[T5_CAPTION_SPLITS], typer.Option(
    help="Caption training rows on a seq2seq LLM (FlanT5): random-prefix (BLIP-2's prefix LM, as LAVIS: the "
         "first 0 to n/2 (rounded down) of a caption's n words, drawn per sample and epoch from --seed, go to the "
         "encoder after the prompt, the rest is the target) or none (the whole caption is the target). "
         "Decoder-only LLMs: unused.")]
ChoiceAnswer = Annotated[Literal[CHOICE_ANSWERS], typer.Option(
    help="Multiple-choice rows: the answer the model is trained to give (and its eval points read): letter "
         "('The answer is B', LaVIN's) or text ('The answer is <the option's words>': words the LLM knows, where "
         "a bare capital letter may be a token it barely trained). The prompt lists lettered options either way. "
         "Other tasks: unused.")]
NumWorkers = Annotated[int, typer.Option(help="DataLoader worker processes that decode images (0: in the main "
                                              "process); the data order and the results stay the same.")]
PoolSize = Annotated[Optional[int], typer.Option(help="infmllm: pool the ViT's SxS patch grid to PxP visual tokens "
                                                      "(P must divide S; default S/2).")]
AdaptivePool = Annotated[bool, typer.Option("--adaptive-pool", help="infmllm: adaptive average pooling, so P need "
                                                                     "not divide S (off by default).")]
LavinHidden = Annotated[Optional[int], typer.Option(help="lavin: hidden width of the Linear-SiLU-Linear connector "
                                                         "(default 128).")]
LavinTokens = Annotated[Optional[int], typer.Option(help="lavin: visual tokens = [CLS] of this many ViT layers, evenly "
                                                         "picked, the last included (default 6).")]
LavinLayers = Annotated[Optional[str], typer.Option(help="lavin: the ViT layers whose [CLS] to take, comma-separated "
                                                         "(0 = embeddings; instead of --lavin-tokens).")]
MmaRank = Annotated[Optional[int], typer.Option(help="lavin: rank of the mixture-of-modality adapters (default 8).")]
MmaTau = Annotated[Optional[float], typer.Option(help="lavin: router temperature (default 10, LaVIN's for 7B; 5 for "
                                                      "13B).")]
MmaScale = Annotated[Optional[float], typer.Option(help="lavin: adapter output scale (default 1).")]
MmaDropout = Annotated[Optional[float], typer.Option(help="lavin: dropout after the down-projection (default 0.1).")]
LoraRank = Annotated[Optional[int], typer.Option(help="plora, infmllm: LoRA rank r (default 8).")]
LoraAlpha = Annotated[Optional[float], typer.Option(help="plora, infmllm: LoRA alpha; the delta is scaled by alpha/r "
                                                         "(default 16).")]
LoraDropout = Annotated[Optional[float], typer.Option(help="plora, infmllm: dropout on the LoRA input (default 0.05).")]
LoraTargets = Annotated[Optional[str], typer.Option(help="plora, infmllm: comma-separated groups (attention, mlp: on MoE LLMs "
                                                         "the experts) or layers (self_attn.q_proj, mlp.experts).")]


def _lora_adapter(connector: str) -> str:
    """The LoRA adapter the --lora-* flags set: the connector's ``lora`` (peft, every token: infmllm), else
    ``plora`` (visual tokens only)."""
    from vpgtrans.model.connectors import CONNECTORS

    entry = CONNECTORS.get(connector)
    return "lora" if entry is not None and any(a["type"] == "lora" for a in entry.adapters) else "plora"


def _adapter_options(lora_rank, lora_alpha, lora_dropout, lora_targets, connector: str = "plora") -> dict:
    """``InheritConfig.adapter_options`` from the friendly --lora-* flags (only those given), for the
    connector's LoRA adapter."""
    plora = {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout,
             "targets": [t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets is not None else None}
    plora = {key: value for key, value in plora.items() if value is not None}
    return {_lora_adapter(connector): plora} if plora else {}


def _train_config(kind: str, lr, max_steps, max_samples, epochs, batch_size, grad_accum, seed, eval_every, max_text_len,
                  recipe_name: str = "vpgtrans", t5_caption_split: str = "random-prefix", choice_answer: str = "letter"):
    from vpgtrans.config import TrainConfig

    overrides = {"batch_size": batch_size, "grad_accum": grad_accum, "seed": seed, "max_steps": max_steps,
                 "max_samples": max_samples, "eval_every": eval_every, "max_text_len": max_text_len,
                 "t5_caption_split": t5_caption_split, "choice_answer": choice_answer}
    if lr is not None:
        overrides["lr"] = lr
        if kind == "finetune":
            overrides["min_lr"] = lr / 2  # keep the recipe's cosine-to-half shape
    if epochs is not None:
        overrides["epochs"] = epochs
    from vpgtrans.recipes import recipe

    own = next((stage for stage in recipe(recipe_name) if stage.name == kind), None)
    if own is not None:  # the recipe's own stage of that name (its trainable parts: plora's adds the LoRA)
        return own.config(**overrides)
    return TrainConfig.warmup(**overrides) if kind == "warmup" else TrainConfig.finetune(**overrides)


def _visual_options(pool_size, adaptive_pool) -> dict:
    """``InheritConfig.visual_options`` from the visual kind's flags (only those given)."""
    return {key: value for key, value in (("pool_size", pool_size), ("adaptive", adaptive_pool or None))
            if value is not None}


def _lavin_flags(hidden, tokens, layers, rank, tau, scale, dropout) -> tuple[dict, dict]:
    """(visual options, adapter options) from the --lavin-* and --mma-* flags given; the --mma-* ones set
    LaVIN's adapters in the LLM and in the ViT alike. A connector without them refuses them (one line)."""
    if layers is not None:
        try:
            layers = [int(item) for item in layers.split(",") if item.strip()]
        except ValueError:
            raise VpgtransError(f"--lavin-layers must be comma-separated ViT layer indices (got {layers!r:.40})") from None
    visual = {key: value for key, value in (("hidden", hidden), ("tokens", tokens), ("layers", layers)) if value is not None}
    mma = {key: value for key, value in (("rank", rank), ("tau", tau), ("scale", scale), ("dropout", dropout))
           if value is not None}
    return visual, ({"mma": mma, "mma-vision": dict(mma)} if mma else {})


def _with_lavin(config, flags: tuple[dict, dict]):
    """``config`` (an ``InheritConfig``) with the LaVIN flags' options added."""
    from vpgtrans.config import replace

    visual, adapters = flags
    return replace(config, visual_options={**config.visual_options, **visual},
                   adapter_options={**config.adapter_options, **adapters})


def _lavin_config(flags: tuple[dict, dict], **fields):
    from vpgtrans.config import InheritConfig

    return _with_lavin(InheritConfig(**fields), flags)


def _stage_configs(recipe_name: str, done: tuple, **overrides) -> dict:
    """``TrainConfig`` of every stage of the recipe not in ``done`` (the stages with their own flags): the
    recipe's values with the shared budget, batch and seed flags (those given)."""
    from vpgtrans.recipes import recipe

    overrides = {key: value for key, value in overrides.items() if value is not None}
    return {stage.name: stage.config(**overrides) for stage in recipe(recipe_name) if stage.name not in done}


def _stage_trainable(configs: dict, specs: list[str] | None, named: dict) -> dict:
    """``configs`` with ``--stage-trainable STAGE=part,part`` applied (``named``: the configs of the stages
    with their own flags, warmup / finetune / scratch)."""
    from vpgtrans.config import replace

    configs = dict(configs)
    for spec in specs or ():
        stage, _, parts = spec.partition("=")
        names = [part.strip() for part in parts.split(",") if part.strip()]
        if not stage.strip() or not names:
            raise VpgtransError(f"--stage-trainable takes STAGE=part[,part...] (got {spec!r})")
        base = configs.get(stage.strip()) or named.get(stage.strip())
        if base is None:
            raise VpgtransError(f"--stage-trainable {spec!r}: the recipe has no stage {stage.strip()!r}")
        configs[stage.strip()] = replace(base, trainable=names)
    return configs


def _stage_set(configs: dict, specs: list[str] | None, named: dict) -> dict:
    """``configs`` with ``--stage-set STAGE.FIELD=VALUE`` applied: a stage's own lr, budget, schedule
    (``TrainConfig`` fields; VALUE read as JSON, ``none`` for None; a text field's VALUE as it is)."""
    from dataclasses import fields

    from vpgtrans.config import TrainConfig, replace

    settable = sorted(f.name for f in fields(TrainConfig) if f.name != "trainable")
    configs = dict(configs)
    for spec in specs or ():
        target, _, text = spec.partition("=")
        stage, _, name = target.strip().partition(".")
        if not stage or not name or not text.strip():
            raise VpgtransError(f"--stage-set takes STAGE.FIELD=VALUE, e.g. instruct.lr=1e-4 (got {spec!r})")
        if name not in settable:
            raise VpgtransError(f"--stage-set {spec!r}: {name!r} is not a stage setting (settable: {', '.join(settable)}; "
                                "parts: --stage-trainable)")
        base = configs.get(stage) or named.get(stage)
        if base is None:
            raise VpgtransError(f"--stage-set {spec!r}: the recipe has no stage {stage!r}")
        try:
            if isinstance(getattr(base, name), str):  # a choice (t5_caption_split=none, choice_scoring=...)
                value = text.strip()
            else:
                value = None if text.strip().lower() == "none" else json.loads(text)
        except ValueError:
            raise VpgtransError(f"--stage-set {spec!r}: {text!r} is not a number, true/false or none") from None
        configs[stage] = replace(base, **{name: value})
    return configs


def _completes(names):
    """Shell completion of an option from ``names`` (nothing matching: the shell completes file names)."""

    def complete(incomplete: str) -> list[str]:
        return [name for name in names if name.startswith(incomplete)]

    return complete


Template = Annotated[Optional[str], typer.Option(
    metavar=f"<{'|'.join(TEMPLATES)}|FILE>", autocompletion=_completes(TEMPLATES), help="Prompt template: a name (vl-vicuna: the image inside a "
    "###Human/###Assistant chat turn) or a JSON file of its fields (default: BLIP-2's for the LLM's kind).")]

Converter = Annotated[Literal[CONVERTERS], typer.Option(help="Word converter: shared-tokens, gw (no shared tokens "
                                                           "needed; POT), auto (shared-tokens if enough pairs, else "
                                                           "gw) or none.")]
Connector = Annotated[str, typer.Option(
    metavar=f"<{'|'.join(CONNECTORS)}>", autocompletion=_completes(CONNECTORS),
    help="How vision attaches to the LLM (linear: BLIP-2's VPG + projector; plora: + LoRA at visual tokens only; "
         "lavin: LaVIN's adapters; infmllm: pool-adapter + LoRA; see docs/connectors.md), or one registered in "
         "vpgtrans.model.connectors.CONNECTORS.")]


def _template(name_or_path: str | None):
    from vpgtrans.config import load_template

    return None if name_or_path is None else load_template(name_or_path)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@command()
def inspect(path: Annotated[Path, typer.Argument(help="HF BLIP-2/InstructBLIP dir, LAVIS .pth, HF LLM dir or bundle.")],
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
            check_text_path: Annotated[bool, typer.Option("--check-text-path", help="Bundle: run probe texts through its "
                                                          "model and the untouched LLM, print the max |logit diff|; "
                                                          "exit 1 if a connector that promises 0 differs.")] = False,
            text: Annotated[Optional[list[str]], typer.Option(
                metavar="TEXT", help="--check-text-path: a probe text (repeatable; default: three built-in probes).")] = None,
            load_in_8bit: LoadIn8bit = False, load_in_4bit: LoadIn4bit = False,
            routing: Annotated[bool, typer.Option("--routing", help="MoE bundle: how each layer's experts split "
                                                  "between visual and text tokens on --data (table; JSON and a "
                                                  "PNG heat map with --out).")] = False,
            data: Annotated[Optional[Path], typer.Option(help="--routing: data to run (any form --data takes).")] = None,
            image_root: ImageRoot = None, data_split: DataSplit = None, data_columns: DataColumns = None,
            out: Annotated[Optional[Path], typer.Option(help="--routing: directory for routing.json and "
                                                             "routing.png.")] = None,
            max_samples: Annotated[int, typer.Option(help="--routing: rows of --data to run.")] = 64):
    """Describe a model, checkpoint or bundle without loading it (--check-text-path and --routing load it)."""
    if check_text_path and routing:
        raise VpgtransError("--check-text-path and --routing are separate runs: give one")
    if routing:
        return _routing(path, _data(data, False, image_root=image_root, split=data_split, columns=data_columns), out,
                        max_samples, as_json)
    if data is not None or out is not None:
        raise VpgtransError("--data and --out go with --routing")
    if check_text_path:
        return _check_text_path(path, text, as_json, load_in_8bit, load_in_4bit)
    if text or load_in_8bit or load_in_4bit:
        raise VpgtransError("--text, --load-in-8bit and --load-in-4bit go with --check-text-path")
    from vpgtrans.inspect import inspect_path, render

    info = inspect_path(path)
    if as_json:
        _print_json(info)
    else:
        from rich.console import Console

        Console().print(render(info))
    if info.get("valid", True) is not True:
        raise VpgtransError(info["valid"])  # described above; the exit code says it is unusable


def _routing(bundle: Path, data: Path | None, out: Path | None, max_samples: int, as_json: bool):
    quiet_libraries()
    from vpgtrans.routing import render_routing, routing_report, save_routing

    if data is None:
        raise VpgtransError("--routing needs --data DIR (rows whose images the model sees)")
    report = routing_report(bundle, data, max_samples=max_samples)
    if as_json:
        _print_json(report)
    else:
        from rich.console import Console

        Console().print(render_routing(report))
    if out is not None:
        paths = save_routing(report, out)
        typer.echo(f"routing written to {paths['json']} and {paths['png']}", err=as_json)


def _check_text_path(bundle: Path, texts, as_json: bool, load_in_8bit: bool, load_in_4bit: bool):
    quiet_libraries()
    from vpgtrans.text_path import check_text_path, render_text_path

    if load_in_8bit and load_in_4bit:
        raise VpgtransError("--load-in-8bit and --load-in-4bit exclude each other")
    quantization = "8bit" if load_in_8bit else "4bit" if load_in_4bit else None
    report = check_text_path(bundle, texts, quantization=quantization)
    if as_json:
        _print_json(report)
    else:
        from rich.console import Console

        Console().print(render_text_path(report))
    if report["promised"] and not report["exact"]:
        typer.echo(f"error: text-only logits differ from the LLM's by up to {report['max_abs_diff']:.3g}, though the "
                   f"bundle's adapters ({', '.join(report['adapters'])}) promise exactly 0", err=True)
        raise typer.Exit(1)


@command(config=True)
def inherit(source: Annotated[Path, typer.Option(help="Source model: HF BLIP-2/InstructBLIP dir or LAVIS .pth.")],
            target_llm: Annotated[Path, typer.Option(help="Target LLM: HF causal LM or T5 directory.")],
            out: Annotated[Path, typer.Option(help="Output bundle directory.")],
            vision: Annotated[Optional[Path], typer.Option(help="Where the ViT comes from (needed for .pth).")] = None,
            source_llm: Annotated[Optional[Path], typer.Option(help="The source LLM dir (needed for .pth with a converter).")] = None,
            converter: Converter = "shared-tokens",
            corpus: Annotated[Optional[Path], typer.Option(help="Text file: weight token pairs by frequency.")] = None,
            template: Template = None,
            ridge: Annotated[float, typer.Option(help="Ridge penalty (relative).")] = 1e-3,
            connector: Connector = "linear",
            trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow the LLM's own code.")] = False,
            pool_size: PoolSize = None, adaptive_pool: AdaptivePool = False,
            lavin_hidden: LavinHidden = None, lavin_tokens: LavinTokens = None, lavin_layers: LavinLayers = None,
            mma_rank: MmaRank = None, mma_tau: MmaTau = None, mma_scale: MmaScale = None, mma_dropout: MmaDropout = None,
            lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None,
            lora_targets: LoraTargets = None, force: Force = False, verbose: Verbose = False):
    """Inherit the source VPG and initialise the projector through the word converter."""
    quiet_libraries()
    setup_logging(verbose)
    from vpgtrans.config import InheritConfig, replace
    from vpgtrans.stages.inherit import inherit as run

    from vpgtrans.outputs import check_out_dir

    config = InheritConfig(converter=converter, ridge=ridge, connector=connector,
                           adapter_options=_adapter_options(lora_rank, lora_alpha, lora_dropout, lora_targets,
                                                            connector))
    config = replace(config, visual_options=_visual_options(pool_size, adaptive_pool))
    config = _with_lavin(config, _lavin_flags(lavin_hidden, lavin_tokens, lavin_layers, mma_rank, mma_tau, mma_scale,
                                              mma_dropout))
    check_out_dir(out, force, inputs=[source, target_llm, vision, source_llm, corpus])
    _check_remote_code(target_llm, trust_remote_code)
    path = run(source, target_llm, out, config, vision=vision, source_llm=source_llm, corpus=corpus,
               trust_remote_code=trust_remote_code, force=force, template=_template(template))
    stats = json.loads((path / "manifest.json").read_text())["metrics"].get("converter")
    if stats:
        retrieval = f", retrieval {stats['retrieval_accuracy']:.3f}" if "retrieval_accuracy" in stats else ""
        typer.echo(f"converter ({stats.get('method', 'shared-tokens')}): {stats['pairs']} token pairs, held-out cosine "
                   f"{stats.get('heldout_cosine', float('nan')):.4f}{retrieval}"
                   + (f" ({stats['reason']})" if "reason" in stats else ""))
    typer.echo(f"bundle written to {path}")


def _data(path: Path | None, strict: bool, bbox_format: str = "xyxy", **options):
    """A data path that carries --strict, --bbox-format and the reading options (``image_root``, ``split``,
    ``columns``: --image-root, --data-split, --data-columns) to every loader it reaches."""
    from vpgtrans.data import DataDir

    return None if path is None else DataDir(path, strict=strict, bbox_format=bbox_format, **options)


def _check_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """Refuse a target LLM that needs its own code unless --trust-remote-code (nothing is run here)."""
    if (model_dir / "config.json").is_file():
        from vpgtrans.formats.hf import require_trusted_code

        require_trusted_code(model_dir, trust_remote_code)


def _run_options(**options):
    from vpgtrans.training import RunOptions

    return RunOptions(**options)


def _finetune_recipe(bundle: Path) -> str:
    """The recipe whose ``finetune`` stage ``vpgtrans finetune`` runs on ``bundle``: its connector's (recorded
    at inherit, found through the stages' ``parent_config``) when that recipe has a finetune stage (lavin's
    trains connector + adapters, not a VPG it does not have), else vpgtrans'."""
    from vpgtrans.bundle import read_manifest
    from vpgtrans.model.connectors import CONNECTORS
    from vpgtrans.recipes import recipe

    try:
        config = read_manifest(Path(bundle)).get("config")
    except VpgtransError:
        return "vpgtrans"  # the stage names what is wrong with the bundle
    for _ in range(64):  # parent_config nests one level per stage
        if not isinstance(config, dict):
            break
        inherit = config.get("inherit")
        connector = inherit.get("connector") if isinstance(inherit, dict) else None
        if connector in CONNECTORS:
            name = CONNECTORS[connector].recipe
            return name if any(stage.name == "finetune" for stage in recipe(name)) else "vpgtrans"
        config = config.get("parent_config")
    return "vpgtrans"


def _with_bundle_adapters(config, bundle: Path):
    """``config`` that also trains the adapter parts the bundle holds inside its LLM (``model.adapters``: plora's
    LoRA), as the connector's recipe does in its fine-tune stage."""
    from vpgtrans.bundle import read_manifest
    from vpgtrans.config import replace

    try:
        model = read_manifest(Path(bundle)).get("model", {})
    except VpgtransError:
        return config  # the stage names what is wrong with the bundle
    adapters = [entry.get("type") for entry in model.get("adapters", []) if isinstance(entry, dict)]
    extra = [name for name in adapters if isinstance(name, str) and name not in config.trainable]
    return replace(config, trainable=[*config.trainable, *extra]) if extra else config


def _train_command(kind: str, bundle: Path, data: Path, out: Path, config, options, *, eval_data: Path | None,
                   strict: bool, force: bool, verbose: bool, bbox_format: str = "xyxy", data_options=None):
    """Run one training stage (``kind``: warmup / finetune / scratch) from a config and run options."""
    quiet_libraries()
    setup_logging(verbose)
    from vpgtrans.outputs import check_out_dir
    from vpgtrans.stages import train

    # Before any compute: --out must not be an input, hold one, or be a directory vpgtrans did not write.
    check_out_dir(out, force or options.resume, inputs=[bundle, data, eval_data])
    data, eval_data = (_data(path, strict, bbox_format, **(data_options or {})) for path in (data, eval_data))
    run = {"warmup": train.warmup_projector, "finetune": train.finetune, "scratch": train.train_from_scratch}[kind]
    path = until_stopped(run, bundle, data, out, config, eval_data=eval_data, force=force,
                          progress=progress_bar(kind, config.batch_size), options=options)
    if not is_main_process():
        return
    metrics = json.loads((path / "manifest.json").read_text())["metrics"]
    typer.echo(f"{kind}: {metrics['train']['steps']} steps, final loss {metrics['train']['final_loss']:.4f}"
               + (f", eval {metrics['eval']}" if "eval" in metrics else ""))
    typer.echo(f"bundle written to {path}")


@command("warmup-projector", config=True)
def warmup_projector(bundle: Annotated[Path, typer.Argument(help="Input bundle (from inherit).")],
                     data: Annotated[Path, typer.Option(help="Training data: a directory, .jsonl, LAVIS .json, imagefolder "
                                                                "or datasets name (docs/data.md).")],
                     out: Annotated[Path, typer.Option(help="Output bundle directory.")],
                     lr: Lr = None, max_steps: MaxSteps = None, max_samples: MaxSamples = None, epochs: Epochs = None,
                     batch_size: BatchSize = 8, grad_accum: GradAccum = 1, seed: Seed = 42,
                     eval_data: EvalData = None, eval_every: EvalEvery = None, max_text_len: int = 64,
                     save_every: SaveEvery = None, resume: Resume = False, skip_nonfinite: SkipNonfinite = 0,
                     dtype: Dtype = None, vision_dtype: VisionDtype = None,
             load_in_8bit: LoadIn8bit = False, load_in_4bit: LoadIn4bit = False,
                     gradient_checkpointing: GradCkpt = False, report_to: ReportTo = "none",
                     num_workers: NumWorkers = 0, t5_caption_split: T5CaptionSplit = "random-prefix",
                     choice_answer: ChoiceAnswer = "letter", strict: Strict = False,
                     bbox_format: BboxFormat = "xyxy", image_root: ImageRoot = None, data_split: DataSplit = None,
                     data_columns: DataColumns = None, force: Force = False, verbose: Verbose = False):
    """Stage 1: train only the projector (5x lr, constant, one epoch); VPG and LLM frozen."""
    config = _train_config("warmup", lr, max_steps, max_samples, epochs, batch_size, grad_accum, seed, eval_every,
                           max_text_len, t5_caption_split=t5_caption_split, choice_answer=choice_answer)
    options = _run_options(save_every=save_every, resume=resume, skip_nonfinite=skip_nonfinite, dtype=dtype,
                           vision_dtype=vision_dtype, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                           gradient_checkpointing=gradient_checkpointing, report_to=report_to,
                           num_workers=num_workers)
    _train_command("warmup", bundle, data, out, config, options, eval_data=eval_data, strict=strict, force=force,
                   verbose=verbose, bbox_format=bbox_format,
                   data_options=dict(image_root=image_root, split=data_split, columns=data_columns))


@command(config=True)
def finetune(bundle: Annotated[Path, typer.Argument(help="Input bundle (from warmup-projector).")],
             data: Annotated[Path, typer.Option(help="Training data: a directory, .jsonl, LAVIS .json, imagefolder "
                                                                "or datasets name (docs/data.md).")],
             out: Annotated[Path, typer.Option(help="Output bundle directory.")],
             lr: Lr = None, max_steps: MaxSteps = None, max_samples: MaxSamples = None, epochs: Epochs = None,
             batch_size: BatchSize = 8, grad_accum: GradAccum = 1, seed: Seed = 42,
             eval_data: EvalData = None, eval_every: EvalEvery = None, max_text_len: int = 64,
             from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Re-initialise VPG + projector first (baseline).")] = False,
             save_every: SaveEvery = None, resume: Resume = False, skip_nonfinite: SkipNonfinite = 0,
             dtype: Dtype = None, vision_dtype: VisionDtype = None,
             load_in_8bit: LoadIn8bit = False, load_in_4bit: LoadIn4bit = False,
             gradient_checkpointing: GradCkpt = False, report_to: ReportTo = "none", num_workers: NumWorkers = 0,
             t5_caption_split: T5CaptionSplit = "random-prefix", choice_answer: ChoiceAnswer = "letter",
             strict: Strict = False,
             bbox_format: BboxFormat = "xyxy", image_root: ImageRoot = None, data_split: DataSplit = None,
             data_columns: DataColumns = None, force: Force = False, verbose: Verbose = False):
    """Stage 2: fine-tune VPG + projector (lr 1e-4 cosine to 5e-5), and the bundle's adapters inside the LLM
    (plora's LoRA) where it has some; ViT and LLM base weights frozen. A bundle of another connector runs its
    recipe's fine-tune stage (lavin: connector + adapters, LaVIN's schedule)."""
    config = _with_bundle_adapters(_train_config("finetune", lr, max_steps, max_samples, epochs, batch_size,
                                                 grad_accum, seed, eval_every, max_text_len,
                                                 _finetune_recipe(bundle), t5_caption_split, choice_answer), bundle)
    options = _run_options(save_every=save_every, resume=resume, skip_nonfinite=skip_nonfinite, dtype=dtype,
                           vision_dtype=vision_dtype, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                           gradient_checkpointing=gradient_checkpointing, report_to=report_to,
                           num_workers=num_workers)
    _train_command("scratch" if from_scratch else "finetune", bundle, data, out, config, options, eval_data=eval_data,
                   strict=strict, force=force, verbose=verbose, bbox_format=bbox_format,
                   data_options=dict(image_root=image_root, split=data_split, columns=data_columns))


@command(config=True)
def transfer(source: Annotated[Path, typer.Option(help="Source model: HF BLIP-2/InstructBLIP dir or LAVIS .pth.")],
             target_llm: Annotated[Path, typer.Option(help="Target LLM directory.")],
             data: Annotated[Path, typer.Option(help="Training data (warm-up, and fine-tune unless --finetune-data).")],
             out: Annotated[Path, typer.Option(help="Output directory (one bundle per stage inside).")],
             finetune_data: Annotated[Optional[Path], typer.Option(help="Data for stage 2.")] = None,
             instruct_data: Annotated[Optional[Path], typer.Option(help="Data for stage 3 where the recipe has one "
                                                                        "(infmllm: instruct; default --finetune-data)."
                                                                   )] = None,
             stage_trainable: Annotated[Optional[list[str]], typer.Option(
                 help="STAGE=part,part: the parts a stage trains instead of its recipe's (repeatable; e.g. "
                      "multitask=pool_adapter).")] = None,
             stage_set: Annotated[Optional[list[str]], typer.Option(
                 help="STAGE.FIELD=VALUE: one stage's own lr, min_lr, max_steps, epochs, warmup_steps, ... "
                      "(repeatable; e.g. instruct.lr=1e-4, align.max_steps=200).")] = None,
             vision: Annotated[Optional[Path], typer.Option(help="Where the ViT comes from (needed for .pth).")] = None,
             source_llm: Annotated[Optional[Path], typer.Option(help="Source LLM dir (needed for .pth).")] = None,
             converter: Converter = "shared-tokens",
             corpus: Annotated[Optional[Path], typer.Option(help="Text file: weight converter pairs by frequency.")] = None,
             template: Template = None,
             ridge: Annotated[float, typer.Option(help="Ridge penalty of the converter fit (relative).")] = 1e-3,
             connector: Connector = "linear",
             recipe: Annotated[Optional[str], typer.Option(
                 metavar=f"<{'|'.join(RECIPES)}>", autocompletion=_completes(tuple(RECIPES)),
                 help="Stages to run after inherit (default: the connector's; vpgtrans: warm-up -> fine-tune), or "
                      "one registered in vpgtrans.recipes.RECIPES.")] = None,
             from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Run the train-from-scratch baseline.")] = False,
             skip_warmup: Annotated[bool, typer.Option("--skip-warmup", help="Ablation: no projector warm-up.")] = False,
             max_steps: MaxSteps = None, max_samples: MaxSamples = None, epochs: Epochs = None,
             batch_size: BatchSize = 8, grad_accum: GradAccum = 1, seed: Seed = 42,
             warmup_lr: Lr = None, warmup_max_steps: MaxSteps = None, warmup_max_samples: MaxSamples = None,
             finetune_lr: Lr = None, finetune_max_steps: MaxSteps = None, finetune_max_samples: MaxSamples = None,
             finetune_epochs: Epochs = None,
             eval_data: EvalData = None, eval_every: EvalEvery = None, max_text_len: int = 64,
             trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow the LLM's own code.")] = False,
             save_every: SaveEvery = None,
             resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run: skip finished stages, resume "
                                                                   "the running one from its latest checkpoint.")] = False,
             skip_nonfinite: SkipNonfinite = 0, dtype: Dtype = None, vision_dtype: VisionDtype = None,
             load_in_8bit: LoadIn8bit = False,
             load_in_4bit: LoadIn4bit = False, gradient_checkpointing: GradCkpt = False, report_to: ReportTo = "none",
             num_workers: NumWorkers = 0, t5_caption_split: T5CaptionSplit = "random-prefix",
             choice_answer: ChoiceAnswer = "letter", pool_size: PoolSize = None, adaptive_pool: AdaptivePool = False,
             lavin_hidden: LavinHidden = None, lavin_tokens: LavinTokens = None, lavin_layers: LavinLayers = None,
             mma_rank: MmaRank = None, mma_tau: MmaTau = None, mma_scale: MmaScale = None, mma_dropout: MmaDropout = None,
             lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None,
             lora_targets: LoraTargets = None, strict: Strict = False, bbox_format: BboxFormat = "xyxy",
             image_root: ImageRoot = None, data_split: DataSplit = None, data_columns: DataColumns = None, force: Force = False,
             verbose: Verbose = False):
    """The whole recipe: inherit -> warm-up -> fine-tune (or --from-scratch for the baseline)."""
    quiet_libraries()
    setup_logging(verbose)
    from vpgtrans.stages.transfer import transfer as run

    def pick(specific, shared):
        return specific if specific is not None else shared

    from vpgtrans.model.connectors import connector as connector_entry

    recipe_name = "scratch" if from_scratch else recipe or connector_entry(connector).recipe
    warmup_config = _train_config("warmup", warmup_lr, pick(warmup_max_steps, max_steps), pick(warmup_max_samples, max_samples),
                                  epochs, batch_size, grad_accum, seed, eval_every, max_text_len, recipe_name,
                                  t5_caption_split, choice_answer)
    finetune_config = _train_config("finetune", finetune_lr, pick(finetune_max_steps, max_steps),
                                    pick(finetune_max_samples, max_samples), pick(finetune_epochs, epochs), batch_size,
                                    grad_accum, seed, eval_every, max_text_len, recipe_name, t5_caption_split,
                                    choice_answer)
    options = _run_options(save_every=save_every, resume=resume, skip_nonfinite=skip_nonfinite, dtype=dtype,
                           vision_dtype=vision_dtype, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                           gradient_checkpointing=gradient_checkpointing, report_to=report_to,
                           num_workers=num_workers)
    from vpgtrans.outputs import check_out_dir

    check_out_dir(out, force or resume, inputs=[source, target_llm, data, finetune_data, instruct_data, eval_data, vision,
                                                source_llm,
                                                corpus])
    _check_remote_code(target_llm, trust_remote_code)
    data, finetune_data, instruct_data, eval_data = (_data(path, strict, bbox_format, image_root=image_root,
                                                           split=data_split, columns=data_columns)
                                                     for path in (data, finetune_data, instruct_data, eval_data))
    configs = _stage_configs(recipe_name, ("warmup", "finetune", "scratch"), max_steps=max_steps,
                             max_samples=max_samples, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                             seed=seed, eval_every=eval_every, max_text_len=max_text_len,
                             t5_caption_split=t5_caption_split, choice_answer=choice_answer)
    named = {"warmup": warmup_config, "finetune": finetune_config, "scratch": finetune_config}
    configs = _stage_set(_stage_trainable(configs, stage_trainable, named), stage_set, named)
    lavin = _lavin_flags(lavin_hidden, lavin_tokens, lavin_layers, mma_rank, mma_tau, mma_scale, mma_dropout)
    summary = until_stopped(run, source, target_llm, data, out, finetune_data=finetune_data, warmup_config=warmup_config,
                             finetune_config=finetune_config, recipe=recipe, configs=configs, instruct_data=instruct_data,
                             inherit_config=_lavin_config(lavin, converter=converter, ridge=ridge, connector=connector,
                                                          visual_options=_visual_options(pool_size, adaptive_pool),
                                                          adapter_options=_adapter_options(lora_rank, lora_alpha,
                                                                                           lora_dropout, lora_targets,
                                                                                           connector)),
                             from_scratch=from_scratch, eval_data=eval_data, vision=vision, source_llm=source_llm,
                             corpus=corpus, skip_warmup=skip_warmup, trust_remote_code=trust_remote_code, force=force,
                             template=_template(template),
                             progress=progress_bar("train", batch_size), options=options)
    if not is_main_process():
        return
    for name, path in summary["stages"].items():
        typer.echo(f"{name}: {path}")
    final = summary["metrics"][list(summary["stages"])[-1]]
    if "eval" in final:
        typer.echo(f"final eval: {final['eval']}")
    typer.echo(f"summary written to {Path(out) / 'transfer.json'}")


@command("eval", config=True)
def eval_(bundle: Annotated[Path, typer.Argument(help="Bundle to evaluate.")],
          data: Annotated[Path, typer.Option(help="Evaluation data: a directory, .jsonl, LAVIS .json, imagefolder or "
                                                  "datasets name (docs/data.md).")],
          task: Annotated[Optional[Literal[TASKS]], typer.Option(help="What to score (default: what the data "
                                                                      "holds).")] = None,
          batch_size: int = 16, max_samples: Annotated[Optional[int], typer.Option(help="Score only the first N.")] = None,
          max_new_tokens: int = 20, num_beams: int = 1,
          out: Annotated[Optional[Path], typer.Option(help="Write scores and predictions to this JSON file.")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False, strict: Strict = False,
          bbox_format: BboxFormat = "xyxy", image_root: ImageRoot = None, data_split: DataSplit = None,
          data_columns: DataColumns = None, force: Force = False,
          dtype: Annotated[Optional[Literal[DTYPES]], typer.Option(help="The frozen LLM's dtype (default "
                                                                      "fp32).")] = None,
          load_in_8bit: LoadIn8bit = False, load_in_4bit: LoadIn4bit = False,
          device_map: Annotated[Optional[Literal[DEVICE_MAPS]], typer.Option(
              help="Spread the LLM over the available devices.")] = None,
          device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: accelerate's device: "
                                                            "the GPU when there is one).")] = None,
          tokenizer: Annotated[Literal[CAPTION_TOKENIZERS], typer.Option(help="Caption tokenisation for CIDEr / BLEU: regex (no Java) or ptb "
                                                      "(COCO's own, needs java; comparable with published scores).")]
          = "regex",
          choice_scoring: Annotated[Literal[CHOICE_SCORING], typer.Option(help="multiple-choice: generate (parse the generated answer, "
                                                           "LaVIN's way) or likelihood (the option whose answer the "
                                                           "model finds most likely: accuracy by the summed "
                                                           "log-probability, lm-eval's acc, and accuracy_norm by the "
                                                           "option's log-probability per UTF-8 byte, its acc_norm).")]
          = "generate",
          choice_answer: Annotated[Optional[Literal[CHOICE_ANSWERS]], typer.Option(
              help="multiple-choice: the answer format to read (generate) or score (likelihood): letter ('The "
                   "answer is B') or text ('The answer is <option>'). Default: the one the bundle was trained "
                   "with (recorded in its manifest), else letter.")] = None,
          submission: Annotated[Optional[Path], typer.Option(help="vqa: also write the answers as a VQAv2 test-server "
                                                                 "file, [{question_id, answer}, ...] (rows need "
                                                                 "question_id).")] = None,
          num_workers: NumWorkers = 0):
    """Generate with the bundle's template and score (caption: CIDEr, BLEU-4; vqa: VQA accuracy, EM;
    grounding: accuracy at IoU >= 0.5, mean IoU; multiple-choice: accuracy, by image / text-only, and the
    count of unparseable answers)."""
    quiet_libraries()
    from vpgtrans.evaluate import evaluate

    if load_in_8bit and load_in_4bit:
        raise VpgtransError("--load-in-8bit and --load-in-4bit exclude each other")
    quantization = "8bit" if load_in_8bit else "4bit" if load_in_4bit else None
    data = _data(data, strict, bbox_format, image_root=image_root, split=data_split, columns=data_columns)
    report = evaluate(bundle, data, task, batch_size, max_samples, max_new_tokens, num_beams,
                      out, strict=strict,
                      force=force, dtype=dtype, quantization=quantization, device_map=device_map, device=device,
                      progress=progress_bar("eval"), tokenizer=tokenizer, num_workers=num_workers,
                      submission=submission, choice_scoring=choice_scoring, choice_answer=choice_answer)
    if as_json:
        _print_json(report)
    else:
        typer.echo(f"{report['task']}: {_scores_line(report['scores'])}")
        for answer_type, scores in report["scores"].get("by_answer_type", {}).items():
            typer.echo(f"  {answer_type}: {_scores_line(scores)}")
        for name, baseline in report.get("baselines", {}).items():
            typer.echo(f"baseline {name}: {_scores_line(baseline)}")
        if out is not None:
            typer.echo(f"predictions written to {out}")
        if submission is not None:
            typer.echo(f"submission ({report['submission']['answers']} answers) written to {submission}")


def _scores_line(scores: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
                     if not isinstance(v, dict))


@command(config=True)
def export(bundle: Annotated[Path, typer.Argument(help="Bundle to export.")],
           out: Annotated[Path, typer.Option(help="Output directory (hf) or .pth file (lavis).")],
           format: Annotated[Literal[EXPORT_FORMATS], typer.Option("--format", help="hf: an HF BLIP-2 directory; "
                                                                 "lavis: a .pth; adapter: the trained parts.")] = "hf",
           merge_lora: Annotated[bool, typer.Option("--merge-lora", help="adapter export of a bundle with peft's LoRA "
                                                                        "(infmllm): also write the LLM with the LoRA "
                                                                        "merged, as a plain HF directory.")] = False,
           dtype: Annotated[Optional[Literal[DTYPES]], typer.Option(help="hf: every weight in this dtype, and load "
                                                                      "in it (default: the LLM's stored dtype).")] = None,
           max_shard_size: Annotated[Optional[str], typer.Option(help="hf: largest weight file, e.g. 5GB, 500MB "
                                                                     "(default 5GB, as the Hub's checkpoints).")] = None,
           push_to_hub: Annotated[Optional[str], typer.Option(help="Upload the export to this Hub model repository "
                                                                  "(user/name; token from HF_TOKEN or huggingface-cli "
                                                                  "login).")] = None,
           force: Force = False):
    """Write a standalone HF BLIP-2 directory (with processor), a LAVIS .pth, or the trained parts alone
    (adapter: loads with vpgtrans.load_model, for any connector)."""
    quiet_libraries()
    from vpgtrans.export import export_bundle

    path = export_bundle(bundle, out, format=format, force=force, merge_lora=merge_lora, dtype=dtype,
                         max_shard_size=max_shard_size)
    typer.echo(f"{format} export written to {path}")
    if push_to_hub:
        from vpgtrans.hub import push_to_hub as push

        typer.echo(f"pushed to {push(path, push_to_hub)}")


@command()
def demo(out: Annotated[Optional[Path], typer.Option(help="Keep the demo's bundles here (default: a temp dir).")] = None,
         force: Force = False, verbose: Verbose = False):
    """Run a complete transfer on tiny models and synthetic data made here (offline, ~2-3 min on CPU): a smoke
    run of the pipeline beside a short, untuned scratch baseline, not a speed-up measure (that is
    benchmarks/transfer_speedup.py)."""
    quiet_libraries()
    setup_logging(verbose)
    from rich.console import Console

    from vpgtrans.demo.run import render_summary, run_demo

    summary = run_demo(out_dir=out, force=force, progress=progress_bar("demo"), log=lambda m: err_console().print(m))
    Console().print(render_summary(summary))


app.add_typer(build_data_app(cli_command), name="data")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        # The command is over (its output complete, or refused): a Ctrl-C while Python shuts down ends the
        # process at once (killed by SIGINT), not with a KeyboardInterrupt traceback from torch's atexit hooks.
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
