"""Writing a model's weights as ``save_pretrained`` does — the same shard files, the same
``model.safetensors.index.json``, byte for byte the same safetensors files — while holding **one tensor
at a time** in memory.

``save_pretrained`` needs the whole state dict in memory and ``safetensors.save_file`` a whole shard:
for a 7B model that is 13 GB (bf16) to 27 GB (fp32) of RAM. Here the caller gives the names, shapes and
dtypes (from a model built on the meta device) and a function that produces one tensor on demand (read
from a checkpoint, or random for a benchmark); each is written and dropped. The split into shards is
huggingface_hub's ``split_torch_state_dict_into_shards`` (the one ``save_pretrained`` calls), run on
meta tensors. The file layout is safetensors': an 8-byte little-endian header length, a JSON header
padded with spaces to 8 bytes, the tensors' bytes back to back, ordered by dtype (widest alignment
first) then name; ``tests/test_shards.py`` checks the bytes against ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors' dtype names, in the order its serializer sorts them (descending: 8-byte types first).
SAFETENSORS_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
    torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


def shard_plan(metas: dict[str, torch.Tensor], max_shard_size: int | str):
    """huggingface_hub's split of ``metas`` (name -> meta tensor, tied copies already removed) into
    shard files named as ``save_pretrained`` names them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    pattern = WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    return split_torch_state_dict_into_shards(metas, filename_pattern=pattern, max_shard_size=max_shard_size)


def save_state_metas(model) -> dict[str, torch.Tensor]:
    """What ``save_pretrained`` would save of ``model`` (built on the meta device is enough): its state
    dict without tied copies, in the names the checkpoint format uses (weight conversions reverted)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))


def write_safetensors(path: Path, metas: dict[str, torch.Tensor], produce: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write the safetensors file ``path`` holding ``metas``' names, shapes and dtypes, each tensor
    taken from ``produce(name)`` when its turn comes (so only one is in memory). Returns bytes written."""
    order = sorted(metas, key=lambda name: (_RANK[metas[name].dtype], name))
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in order:
        meta = metas[name]
        size = meta.numel() * meta.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for name in order:
            tensor = produce(name)
            meta = metas[name]
            if tuple(tensor.shape) != tuple(meta.shape) or tensor.dtype != meta.dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, expected "
                                 f"{tuple(meta.shape)} {meta.dtype}")
            fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return 8 + len(text) + offset


def write_sharded(out_dir: Path, metas: dict[str, torch.Tensor], produce: Callable[[str], torch.Tensor],
                  max_shard_size: int | str, total_parameters: int) -> list[Path]:
    """``save_pretrained``'s weight files in ``out_dir``: ``model.safetensors``, or shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (``total_parameters`` is
    what transformers records there: the model's parameter count). Returns the files written."""
    out_dir = Path(out_dir)
    plan = shard_plan(metas, max_shard_size)
    files = []
    for file_name, names in plan.filename_to_tensors.items():
        files.append(out_dir / file_name)
        write_safetensors(files[-1], {name: metas[name] for name in names}, produce)
    if plan.is_sharded:
        index = {"metadata": {"total_parameters": total_parameters, **plan.metadata},
                 "weight_map": plan.tensor_to_filename}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files.append(out_dir / INDEX_NAME)
    return files
