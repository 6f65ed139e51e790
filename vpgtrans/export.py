"""``export``: materialise a bundle as a standalone model other tools load without vpgtrans.

``hf``     a ``Blip2ForConditionalGeneration`` directory (config.json, safetensors shards of at most
           ``--max-shard-size``, processor, tokenizer, generation_config.json) that loads with
           ``transformers`` alone: the referenced ViT, the bundle's VPG and projector, and the target LLM
           whose tokenizer gains an ``<image>`` special token (the embeddings grow by a mean-initialised
           row when the id is past the table). Every weight in one dtype (``--dtype``, else the LLM's),
           which config.json names. Written tensor by tensor from the input files: a 7B export never
           holds more than one tensor of the LLM in memory. The tokenizer is made to add what the template puts
           around the text (BOS after the image tokens; EOS for T5), and the export checks that
           ``Blip2Processor`` then gives exactly the template's ids; any difference is a warning.
``lavis``  a LAVIS-style ``.pth`` (``{"model", "config", "iters": 0}``) holding what LAVIS checkpoints
           hold: the VPG and the projector, in LAVIS names.
``adapter`` the trained parts and the manifest (a bundle ``vpgtrans.load_model`` loads), plus
           ``adapter_config.json`` naming the base models and a README with the loading snippet: for any
           composition; ``hf`` and ``lavis`` only where the mapping is exact (the qformer visual kind with
           a linear projector and no adapters inside the LLM).

Both write a temporary sibling, fsync it and rename it into place, so a reader never sees half an
export; ``--force`` replaces only a previous vpgtrans output at that path (``vpgtrans.outputs``), and
the bundle is only read.
``vpgtrans_export.json`` (in the HF directory; the ``config`` entry of the .pth) records the source
bundle (path and manifest hash), the toolkit version, the text to give the processor per task, and
warnings. InstructBLIP VPGs export to LAVIS only: vpgtrans runs their Q-Former without instruction
text, HF InstructBLIP always feeds it one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from vpgtrans import __version__
from vpgtrans.bundle import (CONNECTOR_FILE, MANIFEST, VPG_FILE, check_references, commit_out_dir, file_sha256,
                             fingerprint, load_tensors, part_files, prepare_out_dir, reference_errors,
                             validate_bundle)
from vpgtrans.config import BOS_SLOT, IMAGE_SLOT, PromptTemplate, from_dict
from vpgtrans.errors import VpgtransError
from vpgtrans.outputs import EXPORT_INFO, check_out_dir, output_errors

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SAMPLE_QUESTION = "what is in the picture?"  # only used to check the processor against the template

# transformers 5's save_pretrained default is 50GB, which writes a 7B export as one 15 GB file; 5GB is what
# the Hub's own checkpoints (and transformers 4) use: a 7B model in a few files, each under the Hub's limits.
MAX_SHARD_SIZE = "5GB"


def shard_size(value: str | int) -> int:
    """``--max-shard-size`` ("5GB", "500MB", or bytes) as bytes; a bad value is one line."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = int(value) if isinstance(value, str) and value.strip().isdigit() else parse_size_to_int(value)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise VpgtransError(f"--max-shard-size must be a size such as 5GB, 500MB or a number of bytes (got {value!r})")
    return size


def export_bundle(bundle_dir, out_dir, format: str = "hf", force: bool = False, merge_lora: bool = False,
                  dtype: str | None = None, max_shard_size: str | int | None = None) -> Path:
    """Export the bundle at ``bundle_dir`` to ``out_dir`` (a directory for ``hf`` and ``adapter``, a ``.pth``
    file for ``lavis``); refuses an existing ``out_dir`` unless ``force``. Returns the path written.
    ``merge_lora`` (adapter format, a bundle with the ``lora`` adapter): also the LLM with it merged.
    ``dtype`` (hf only: fp32 / bf16 / fp16): every weight cast to it, and the dtype transformers loads in;
    default: the LLM's stored dtype, for every weight. ``max_shard_size`` (hf only; "5GB", "500MB" or bytes,
    default ``MAX_SHARD_SIZE``): the largest weight file, as ``save_pretrained``'s."""
    from vpgtrans.model.spec import upgrade
    from vpgtrans.training import torch_dtype

    if format not in EXPORTERS:
        raise VpgtransError(f"unknown export format {format!r}; choose one of: {', '.join(EXPORTERS)}")
    if dtype is not None and format != "hf":
        raise VpgtransError(f"--dtype applies to --format hf (the {format} export keeps the trained weights as trained)")
    if max_shard_size is not None and format != "hf":
        raise VpgtransError(f"--max-shard-size applies to --format hf (the {format} export is one small file per part)")
    torch_dtype(dtype)  # an unknown name is one line before anything is read
    max_shard_size = shard_size(MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    # The LAVIS file and the adapter export hold only the trained parts: they need no ViT or LLM here.
    manifest = validate_bundle(bundle_dir, check_references=format == "hf")
    for file_name in part_files(manifest).values():
        load_tensors(bundle_dir, file_name)  # NaN / Inf in a trained part: one line before anything is written
    model = upgrade(manifest["model"])
    if format in ("hf", "lavis"):
        visual, adapters = model["visual"], model.get("adapters", [])
        why = (f"its visual kind is {visual['type']!r}, not BLIP-2's Q-Former" if visual["type"] != "qformer" else
               f"its projector is {visual['connector']['type']!r}, not BLIP-2's linear language_projection"
               if visual["connector"]["type"] != "linear" else
               f"it has adapters inside the LLM ({', '.join(a['type'] for a in adapters)}), which BLIP-2 has no "
               "place for" if adapters else None)
        if why:
            raise VpgtransError(f"{bundle_dir}: cannot be exported as {format}: {why}; use --format adapter "
                                "(loads with vpgtrans.load_model)")
    if merge_lora and (format != "adapter" or not any(a["type"] == "lora" for a in model.get("adapters", []))):
        raise VpgtransError(f"{bundle_dir}: --merge-lora needs --format adapter and a bundle with the lora adapter "
                            "(--connector infmllm)")
    if merge_lora:
        return export_adapter(bundle_dir, {**manifest, "model": model}, out_dir, force, merge_lora=True)
    if format == "hf":
        return export_hf(bundle_dir, {**manifest, "model": model}, out_dir, force, dtype=dtype,
                         max_shard_size=max_shard_size)
    with output_errors(out_dir):  # these read only the (validated) bundle: a failed write is the output's
        return EXPORTERS[format](bundle_dir, {**manifest, "model": model}, out_dir, force)


def _trained_parts(bundle_dir: Path) -> dict:
    """The bundle's VPG and projector in HF BLIP-2 names (``vision_model.post_layernorm`` = ln_vision)."""
    from vpgtrans.naming import parts_to_hf

    try:
        return parts_to_hf({"vpg": load_tensors(bundle_dir, VPG_FILE), "connector": load_tensors(bundle_dir, CONNECTOR_FILE)})
    except VpgtransError as exc:
        raise VpgtransError(f"{bundle_dir}: {exc}") from None


def _export_info(bundle_dir: Path, manifest: dict, format: str, **extra) -> dict:
    return {
        "format": format,
        "vpgtrans_version": __version__,
        "bundle": {"path": str(bundle_dir.resolve()), "manifest_sha256": file_sha256(bundle_dir / MANIFEST),
                   "stage": manifest["stage"], "vpgtrans_version": manifest["vpgtrans_version"]},
        "references": manifest["references"],
        "template": manifest["template"],
        **extra,
    }


# --------------------------------------------------------------------------------------------- LAVIS


def lavis_projection_prefix(manifest: dict) -> str:
    """The projector's name in LAVIS, from the target LLM's family (its config's model_type)."""
    model_type = manifest["model"]["llm"]["model_type"]
    if model_type == "t5":
        return "t5_proj"  # blip2_t5, blip2_t5_instruct
    if manifest["model"]["visual"]["vpg"]["kind"] == "instructblip":
        return "llm_proj"  # blip2_vicuna_instruct
    return {"opt": "opt_proj", "llama": "llama_proj"}.get(model_type, "llm_proj")


def export_lavis(bundle_dir: Path, manifest: dict, out_path: Path, force: bool) -> Path:
    if out_path.suffix != ".pth":
        raise VpgtransError(f"{out_path}: a LAVIS export is a single .pth file; give a path ending in .pth")
    if out_path.is_dir() and not out_path.is_symlink():
        raise VpgtransError(f"{out_path}: is a directory; a LAVIS export is a single .pth file")
    check_out_dir(out_path, force, inputs=[bundle_dir], is_file=True)
    from vpgtrans.formats.lavis import hf_to_lavis, save_pth

    prefix = lavis_projection_prefix(manifest)
    state = hf_to_lavis(_trained_parts(bundle_dir), projection_prefix=prefix)
    model = manifest["model"]
    config = _export_info(bundle_dir, manifest, "lavis", model=model, projection_prefix=prefix,
                          num_query_tokens=model["visual"]["vpg"]["num_query_tokens"])
    config = json.loads(json.dumps(config))  # JSON-safe: plain dicts, lists, strings and numbers only
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_pth(state, out_path, config=config)
    log.info("exported %s -> %s (LAVIS, %d tensors, projector %s)", bundle_dir, out_path, len(state), prefix)
    return out_path


# ------------------------------------------------------------------------------------------------ HF


def _add_image_token(tokenizer) -> tuple[str, int]:
    """Add ``<image>`` as a special token (unless the tokenizer already names one); return it and its id."""
    from transformers import AddedToken

    token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, normalized=False, special=True)], special_tokens=True)
    return token, tokenizer.convert_tokens_to_ids(token)


def _processor_prompts(template: PromptTemplate) -> tuple[dict, list[str]]:
    """The text to give ``Blip2Processor`` for each task, and why it cannot reproduce the template.

    The HF processor always puts the K image tokens first, then the tokenizer's encoding of the text
    (with the tokenizer's own special tokens, e.g. BOS)."""
    prompts, problems = {}, []
    for task in ("caption", "vqa"):
        text = getattr(template, task)
        before, after = text.split(IMAGE_SLOT)
        if before:
            problems.append(f"{task} template {text!r} has text before {IMAGE_SLOT}; the HF processor always puts "
                            "the image tokens first")
        rest = after[len(BOS_SLOT):] if after.startswith(BOS_SLOT) else after
        if BOS_SLOT in rest:
            problems.append(f"{task} template {text!r} has {BOS_SLOT} other than right after {IMAGE_SLOT}")
        prompts[task] = rest.replace(BOS_SLOT, "")
    return prompts, problems


def _fit_special_tokens(tokenizer, template: PromptTemplate, is_encoder_decoder: bool) -> None:
    """Make the tokenizer add what the template puts around the text: BOS first where the template has
    ``{image}{bos}`` (BLIP-2 OPT/LLaMA), EOS last for seq2seq (FlanT5). Real OPT, LLaMA and T5
    tokenizers already do; tokenizers that do not are switched, when their backend allows it."""
    want_bos = template.caption.split(IMAGE_SLOT)[1].startswith(BOS_SLOT) and tokenizer.bos_token_id is not None
    want_eos = is_encoder_decoder and tokenizer.eos_token_id is not None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    has_bos = len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id
    has_eos = len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id
    for name, want, has in (("add_bos_token", want_bos, has_bos), ("add_eos_token", want_eos, has_eos)):
        if want != has and hasattr(type(tokenizer), name):
            try:
                setattr(tokenizer, name, want)  # fast tokenizers rebuild their post-processor
            except (AttributeError, ValueError):
                pass  # _check_processor reports the difference


def _check_processor(processor, tokenizer_ids, prompts: dict, image_token_id: int) -> list[str]:
    """Compare the processor's input ids with the template's (``tokenizer_ids(task, question)``)."""
    from PIL import Image

    from vpgtrans.model.vlm import IMAGE_TOKEN_ID

    image = Image.new("RGB", (8, 8))
    problems = []
    for task, text in prompts.items():
        question = SAMPLE_QUESTION if task == "vqa" else None
        theirs = processor(images=image, text=text.replace("{question}", question or ""))["input_ids"][0]
        ours = [image_token_id if i == IMAGE_TOKEN_ID else i for i in tokenizer_ids(task, question)]
        if list(theirs) != ours:
            problems.append(f"{task}: the HF processor gives {list(theirs)} for {text!r} where the bundle's template "
                            f"gives {ours}")
    return problems


def _generation_config(config, llm_config, tokenizer, template: PromptTemplate, image_token_id: int):
    """The LLM's generation config, stopping also on the template's stop token ("\\n" for BLIP-2 OPT)
    and never emitting the image token."""
    from vpgtrans.prompting import stop_token_ids

    eos = config.eos_token_id if config.eos_token_id is not None else llm_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    for token_id in stop_token_ids(tokenizer, template):
        if token_id not in eos and token_id != tokenizer.unk_token_id:
            eos.append(token_id)
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.suppress_tokens = sorted(set(config.suppress_tokens or []) | {image_token_id})
    return config


def export_hf(bundle_dir: Path, manifest: dict, out_dir: Path, force: bool, dtype: str | None = None,
              max_shard_size: str | int = MAX_SHARD_SIZE) -> Path:
    info, refs = manifest["model"], manifest["references"]
    if info["visual"]["vpg"]["kind"] == "instructblip":
        raise VpgtransError(f"{bundle_dir}: HF export of InstructBLIP VPGs is not supported yet (HF InstructBLIP "
                            "feeds the instruction to the Q-Former through a BERT tokenizer, which this bundle "
                            "does not use); export with --format lavis")
    template = from_dict(PromptTemplate, manifest["template"], "template")
    check_references(bundle_dir, manifest)
    tmp = prepare_out_dir(out_dir, force, inputs=[bundle_dir, refs["vision"]["path"], refs["llm"]["path"]])
    try:
        with reference_errors(manifest):
            _write_hf(tmp, bundle_dir, manifest, template, dtype, out_dir, max_shard_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (HF Blip2ForConditionalGeneration)", bundle_dir, out_dir)
    return commit_out_dir(tmp, out_dir)


def _llm_side(ref: dict):
    """The target LLM's config, tokenizer and generation config: no weights are read."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    remote = bool(ref.get("trust_remote_code", False))
    try:
        config = AutoConfig.from_pretrained(ref["path"], trust_remote_code=remote)
        tokenizer = AutoTokenizer.from_pretrained(ref["path"], trust_remote_code=remote)
    except (OSError, ValueError) as exc:
        raise VpgtransError(f"{ref['path']}: cannot load the LLM ({str(exc).splitlines()[0]})") from None
    try:
        generation = GenerationConfig.from_pretrained(ref["path"])
    except OSError:  # no generation_config.json: what from_pretrained gives the model then
        generation = GenerationConfig.from_model_config(config)
    return config, tokenizer, generation


def _stored_dtype(config, shapes: dict) -> str:
    """The LLM's dtype as transformers' dtype="auto" takes it: its config's, else its stored tensors'."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if named is not None:
        return str(named).replace("torch.", "")
    from vpgtrans.inspect import SAFETENSORS_DTYPES

    floats = [SAFETENSORS_DTYPES.get(dtype, dtype) for _, dtype in shapes.values()]
    floats = [d for d in floats if d.startswith(("float", "bfloat"))]
    return max(set(floats), key=floats.count) if floats else "float32"


class _TensorSource:
    """Tensors by export name, each read when asked for: the bundle's trained parts (in memory, small), the
    ViT's and the LLM's from their safetensors files (memory-mapped, one tensor at a time)."""

    def __init__(self, in_memory: dict, on_disk: dict):
        self.in_memory, self.on_disk = in_memory, on_disk  # name -> tensor; name -> (file, stored name)
        self.handles = {}

    def __call__(self, name: str):
        if name in self.in_memory:
            return self.in_memory[name]
        file, stored = self.on_disk[name]
        if file not in self.handles:
            from safetensors import safe_open

            self.handles[file] = safe_open(str(file), framework="pt")
        return self.handles[file].get_tensor(stored)


def _weight_sources(ref_path: Path, names, prefix: str, keep=lambda name: True) -> dict | None:
    """export name -> (file, stored name) for ``names`` of the directory at ``ref_path``, or None when its
    weights are not all safetensors (then they are loaded the usual way)."""
    from vpgtrans.formats.hf import weight_files

    files = weight_files(ref_path)
    if any(Path(file).suffix != ".safetensors" for file in files.values()):
        return None
    return {prefix + short: (files[stored], stored) for short, stored in names.items() if keep(short)}


def _write_hf(tmp: Path, bundle_dir: Path, manifest: dict, template: PromptTemplate, dtype: str | None = None,
              out_dir: Path | None = None, max_shard_size: str | int = MAX_SHARD_SIZE) -> None:
    """The BLIP-2 directory in ``tmp``. The weights are streamed: the composed model exists only on the meta
    device (its names, shapes and the shards ``save_pretrained`` would write), and each tensor is read from
    the bundle, the ViT or the LLM, cast to the export's one dtype and written, one at a time."""
    import torch
    from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    from vpgtrans.formats.hf import WEIGHT_FILE, WEIGHT_INDEX, tensor_shapes, weight_files
    from vpgtrans.formats.shards import save_state_metas, write_sharded
    from vpgtrans.images import build_image_processor
    from vpgtrans.model.assemble import load_llm
    from vpgtrans.naming import LLM_PREFIX, VISION_PREFIX, vision_state
    from vpgtrans.prompting import prompt_ids
    from vpgtrans.training import torch_dtype

    info, refs = manifest["model"], manifest["references"]
    is_encoder_decoder = bool(info["llm"]["is_encoder_decoder"])
    num_query_tokens = int(info["visual"]["vpg"]["num_query_tokens"])
    llm_path, vision_ref = Path(refs["llm"]["path"]), refs["vision"]

    llm_config, tokenizer, generation_config = _llm_side(refs["llm"])
    llm = None
    if not ((llm_path / WEIGHT_INDEX).is_file() or (llm_path / WEIGHT_FILE).is_file()):
        # pytorch_model.bin: transformers reads it (weights_only, refusals named as before), whole.
        llm, _ = load_llm(refs["llm"], is_encoder_decoder, dtype="auto")
    llm_shapes = tensor_shapes(llm_path) if llm is None else {}
    llm_dtype = _stored_dtype(llm_config, llm_shapes) if llm is None else str(llm.dtype).replace("torch.", "")
    # One dtype for every floating tensor: --dtype, else the LLM's (what from_pretrained's default dtype="auto"
    # then loads the whole model in, recorded in config.json; transformers would record the first parameter's,
    # the trained fp32 query tokens, and a 7B export would load in fp32).
    saved_dtype = str(torch_dtype(dtype) or torch.float32).replace("torch.", "") if dtype is not None else llm_dtype
    cast = getattr(torch, saved_dtype)
    image_token, image_token_id = _add_image_token(tokenizer)
    generation_config = _generation_config(generation_config, llm_config, tokenizer, template, image_token_id)
    text_config = {k: v for k, v in llm_config.to_dict().items() if k != "_name_or_path"}
    # The image token's row: the embeddings grow to hold it (filled with the mean row below).
    text_config["vocab_size"] = max(text_config.get("vocab_size") or 0, image_token_id + 1)
    # HF BLIP-2's generate() runs language_model.generate(), whose generation config comes from
    # text_config, not from generation_config.json: the stop token has to be there too.
    text_config["eos_token_id"] = generation_config.eos_token_id
    try:
        config = Blip2Config(vision_config=info["vision"]["config"], qformer_config=info["visual"]["vpg"]["qformer_config"],
                             text_config=text_config, num_query_tokens=num_query_tokens,
                             image_token_index=image_token_id)
    except (KeyError, ValueError, TypeError) as exc:
        raise VpgtransError(f"{refs['llm']['path']}: transformers cannot build a BLIP-2 around this LLM "
                            f"({str(exc).splitlines()[0]})") from None
    if config.use_decoder_only_language_model == is_encoder_decoder:
        raise VpgtransError(f"{refs['llm']['path']}: BLIP-2 would wrap model_type {llm_config.model_type!r} as "
                            f"{'a causal' if config.use_decoder_only_language_model else 'a seq2seq'} LM, but the "
                            "bundle was made for the other kind")
    with torch.device("meta"):  # names, shapes and shards only: no weights, no random init
        model = Blip2ForConditionalGeneration(config)
    metas = {name: meta.to(cast) if meta.is_floating_point() else meta for name, meta in save_state_metas(model).items()}

    # Where each tensor comes from: the bundle (VPG, projector), the ViT's and the LLM's files.
    prefixed = vision_ref["kind"] == "hf-blip2"
    vision_names = vision_state({name: name for name in weight_files(Path(vision_ref["path"]))
                                 if not prefixed or name.startswith(VISION_PREFIX)}, prefixed)
    on_disk = _weight_sources(Path(vision_ref["path"]), vision_names, VISION_PREFIX) or {}
    in_memory = _trained_parts(bundle_dir)
    if len(on_disk) != len(vision_names):  # a pytorch_model.bin ViT: read whole, as before
        from vpgtrans.model.assemble import load_vision_state

        in_memory.update({VISION_PREFIX + k: v for k, v in load_vision_state(vision_ref).items()})
    llm_names = {name[len(LLM_PREFIX):] for name in metas if name.startswith(LLM_PREFIX)}
    llm_sources = None if llm is not None else \
        _weight_sources(llm_path, {name: name for name in llm_shapes if name in llm_names}, LLM_PREFIX)
    if llm_sources is not None and len(llm_sources) == len(llm_names):
        on_disk.update(llm_sources)
    else:  # weights the model names differently (or .bin files): load the LLM and take its checkpoint-format state
        if llm is None:
            llm, _ = load_llm(refs["llm"], is_encoder_decoder, dtype="auto")
        in_memory.update({LLM_PREFIX + k: v for k, v in save_state_metas(llm).items()})
    del llm
    missing = sorted(set(metas) - set(in_memory) - set(on_disk))
    if missing:
        raise VpgtransError(f"the composed BLIP-2 weights lack {len(missing)} tensor(s): {', '.join(missing[:5])}")
    grow = _table_names(model)
    source = _TensorSource(in_memory, on_disk)

    def produce(name: str):
        tensor, meta = source(name), metas[name]
        if tensor.shape != meta.shape and name in grow and tensor.shape[1:] == meta.shape[1:]:
            tensor = torch.cat([tensor, tensor.mean(0, keepdim=True).expand(meta.shape[0] - tensor.shape[0], *meta.shape[1:])])
        if tensor.shape != meta.shape:
            raise VpgtransError(f"the composed BLIP-2 weights: {name} is {tuple(tensor.shape)}, the model expects "
                                f"{tuple(meta.shape)}")
        return tensor.to(meta.dtype)

    with output_errors(out_dir or tmp, tmp):  # a full disk is the output's fault, never the input model's
        write_sharded(tmp, metas, produce, max_shard_size, model.num_parameters())
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        generation_config.save_pretrained(tmp)
    del model
    in_memory.clear()  # (the trained parts' copies)
    source.handles.clear()
    _record_dtype(tmp / "config.json", saved_dtype)

    # The processor: BLIP-2 preprocessing + the LLM's tokenizer with <image>, K image tokens per image.
    _fit_special_tokens(tokenizer, template, is_encoder_decoder)
    processor_info = info["image_processor"]
    image_processor = build_image_processor(processor_info["image_size"], processor_info["image_mean"],
                                            processor_info["image_std"])
    with output_errors(out_dir or tmp, tmp):
        Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                       num_query_tokens=num_query_tokens).save_pretrained(tmp)

    # Check what a user of the export gets against what the bundle's model is given.
    prompts, warnings = _processor_prompts(template)
    for role in ("vision", "llm"):
        ref = refs[role]
        if ref.get("fingerprint") and fingerprint(Path(ref["path"])) != ref["fingerprint"]:
            warnings.append(f"the referenced {role} at {ref['path']} changed since the bundle was made; the export "
                            "holds the changed one")
    warnings += _check_processor(
        AutoProcessor.from_pretrained(tmp),
        lambda task, q: prompt_ids(tokenizer, template, task, num_query_tokens, q, is_encoder_decoder),
        prompts, image_token_id)
    ln_eps, vit_eps = info["visual"]["vpg"].get("ln_eps", 1e-6), info["vision"]["config"].get("layer_norm_eps", 1e-6)
    if ln_eps != vit_eps:
        warnings.append(f"the VPG's ln_vision uses eps {ln_eps}, HF BLIP-2's post_layernorm the vision config's "
                        f"{vit_eps} (as in transformers' own LAVIS conversion); outputs differ very slightly")
    for warning in warnings:
        log.warning("export: %s", warning)
    export_info = _export_info(bundle_dir, manifest, "hf", llm_dtype=llm_dtype, dtype=saved_dtype,
                               image_token=image_token, image_token_id=image_token_id, processor_prompts=prompts,
                               warnings=warnings)
    (tmp / EXPORT_INFO).write_text(json.dumps(export_info, indent=2) + "\n")
    from vpgtrans.hub import model_card

    model_card(bundle_dir, manifest, "hf", _HF_USAGE.format(
        prompt=prompts["vqa"].replace("{question}", "what is in the picture?"))).save(tmp / "README.md")


def _table_names(model) -> set[str]:
    """Names of the LLM's vocabulary-sized tensors in ``model`` (input embeddings, an untied output layer
    and its bias): those the image token's row is appended to. The image token's input row is never read
    (soft prompts replace it); its output row is suppressed at generation (``suppress_tokens``)."""
    llm = model.language_model
    names = {id(tensor): name for name, tensor in model.named_parameters()}
    tables = [llm.get_input_embeddings().weight]
    out = llm.get_output_embeddings()
    if out is not None:
        tables += [out.weight] + ([out.bias] if getattr(out, "bias", None) is not None else [])
    return {names[id(tensor)] for tensor in tables if id(tensor) in names}


_HF_USAGE = """```python
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model = Blip2ForConditionalGeneration.from_pretrained("path/to/this/directory")  # in the dtype config.json names
processor = Blip2Processor.from_pretrained("path/to/this/directory")
inputs = processor(images=Image.open("photo.jpg"), text={prompt!r}, return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs, max_new_tokens=20), skip_special_tokens=True))
```

`vpgtrans_export.json` gives the exact prompt text per task and any difference the export found between
this processor and the prompts the model was trained with."""


def _record_dtype(config_path: Path, dtype: str) -> None:
    """Name ``dtype`` in an exported config.json (top level and each sub-config that names one)."""
    config = json.loads(config_path.read_text())
    config["dtype"] = dtype
    for value in config.values():
        if isinstance(value, dict) and "dtype" in value:
            value["dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- adapter

ADAPTER_CONFIG = "adapter_config.json"
PEFT_DIR = "llm_lora"  # the lora adapter as peft saves it
MERGED_DIR = "llm_merged"  # --merge-lora: the LLM with the lora adapter merged


def export_adapter(bundle_dir: Path, manifest: dict, out_dir: Path, force: bool, merge_lora: bool = False) -> Path:
    """The trained parts only, as peft exports an adapter: the bundle's part files and manifest (so the
    directory is itself a bundle ``vpgtrans.load_model`` loads), ``adapter_config.json`` naming the base
    models (path and fingerprint) and the parts, and a README with the loading snippet. A ``lora``
    adapter (peft's LoRA on the LLM) is also written as a peft adapter directory ``llm_lora/``
    (``PeftModel.from_pretrained(llm, OUT/llm_lora)``), and with ``merge_lora`` merged into a plain HF
    LLM directory ``llm_merged/``."""
    tmp = prepare_out_dir(out_dir, force, inputs=[bundle_dir])
    try:
        for file_name in manifest["files"]:
            shutil.copy2(bundle_dir / file_name, tmp / file_name)
        # The manifest as the bundle's, its references' relative paths from where the export will be.
        saved = json.loads((bundle_dir / MANIFEST).read_text())
        for role, ref in saved["references"].items():
            found = manifest["references"].get(role, {}).get("path")  # where it is on this machine
            if isinstance(ref, dict) and isinstance(found, str) and found:
                ref["relative_path"] = os.path.relpath(Path(found).resolve(), Path(out_dir).resolve())
        (tmp / MANIFEST).write_text(json.dumps(saved, indent=2) + "\n")
        refs, model = manifest["references"], manifest["model"]
        config = _export_info(bundle_dir, manifest, "adapter",
                              base_models={role: {k: refs[role].get(k) for k in ("path", "kind", "fingerprint")
                                                  if refs[role].get(k) is not None} for role in ("vision", "llm")},
                              visual=model["visual"]["type"], adapters=model.get("adapters", []),
                              parts=part_files(manifest))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        from vpgtrans.hub import model_card

        model_card(bundle_dir, manifest, "adapter", _adapter_usage(config)).save(tmp / "README.md")
        lora = [entry for entry in model.get("adapters", []) if entry["type"] == "lora"]
        if lora:
            from vpgtrans.model.adapters.lora import merge_lora as merge, save_peft

            peft_dir = save_peft(tmp / PEFT_DIR, lora[0], load_tensors(bundle_dir, "lora.safetensors"),
                                 base_model=refs["llm"]["path"])
            if merge_lora:
                merge(tmp / MERGED_DIR, Path(refs["llm"]["path"]), peft_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (adapter: %s)", bundle_dir, out_dir, ", ".join(config["parts"].values()))
    return commit_out_dir(tmp, out_dir)


def _adapter_usage(config: dict) -> str:
    bases = "\n".join(f"- {role}: `{base['path']}` ({base.get('fingerprint', 'no fingerprint')})"
                      for role, base in config["base_models"].items())
    return f"""Trained parts only ({', '.join(config['parts'].values())}): visual kind `{config['visual']}`, adapters
{[a['type'] for a in config['adapters']] or 'none'}. The frozen base models are not included; they are read from:

{bases}

```python
import vpgtrans

model = vpgtrans.load_model("path/to/this/directory")  # VisionLanguageModel: forward / generate
```

`vpgtrans eval`, `vpgtrans export` and the training commands take this directory as a bundle.
"""


EXPORTERS = {"hf": export_hf, "lavis": export_lavis, "adapter": export_adapter}
