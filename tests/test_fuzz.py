"""Property-based tests (hypothesis) on every parser of user input: configs, the LAVIS <-> HF key maps,
the jsonl reader, bundle manifests, and the box-text parser. Anything may come in; only a one-line
``VpgtransError`` may come out, and the bookkeeping always adds up."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from vpgtrans.config import InheritConfig, PromptTemplate, TrainConfig, from_dict, to_dict
from vpgtrans.data import load_rows
from vpgtrans.errors import VpgtransError
from vpgtrans.formats import lavis
from vpgtrans.grounding import box_iou, format_box, parse_box

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | \
    st.floats(allow_nan=False, allow_infinity=False, width=32) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _one_line(exc: VpgtransError) -> None:
    assert "\n" not in str(exc) and str(exc)


# --- configs: from_dict of anything -----------------------------------------------------------------


@FAST
@given(st.sampled_from([TrainConfig, InheritConfig, PromptTemplate]), st.data())
def test_configs_from_any_json(cls, data):
    base = to_dict(cls())
    keys = data.draw(st.lists(st.sampled_from(sorted(base)) | st.text(max_size=8), max_size=4))
    raw = {**base, **{key: data.draw(json_values) for key in keys}}
    if data.draw(st.booleans()):
        raw.pop(data.draw(st.sampled_from(sorted(raw))), None)
    try:
        config = from_dict(cls, json.loads(json.dumps(raw)))
    except VpgtransError as exc:
        _one_line(exc)
        event("refused")
        return
    event("accepted")
    assert from_dict(cls, json.loads(json.dumps(to_dict(config)))) == config  # accepted -> round-trips


# --- LAVIS <-> HF key maps, generated from the tables themselves -----------------------------------

_CHOICES = {name: pattern.split("|") for name, pattern in lavis._FIELDS.items() if name != "n"}


def _fill(template: str, draw, n: int, proj: str) -> str:
    def value(match):
        name = match.group(1)
        return str(n) if name == "n" else proj if name == "proj" else draw(st.sampled_from(_CHOICES[name]))
    return re.sub(r"\{(\w+)\}", value, template)


@st.composite
def lavis_states(draw):
    """(instruct?, projection prefix, a valid LAVIS state dict from the key tables, extra keys that must be
    reported as dropped). Layer indices are random; q_bias/v_bias come in pairs with a fitting qkv.weight."""
    instruct = draw(st.booleans())
    proj = draw(st.sampled_from(lavis.PROJECTION_PREFIXES))
    table = lavis.VPG_KEYS + lavis.VISION_KEYS + lavis.PROJECTION_KEYS + \
        (lavis.INSTRUCTBLIP_EMBEDDING_KEYS + lavis.QFORMER_TEXT_KEYS if instruct else lavis.BLIP2_EMBEDDING_KEYS)
    layers = draw(st.lists(st.integers(0, 99), min_size=1, max_size=3, unique=True))
    state = {}
    for template, _ in draw(st.lists(st.sampled_from(table), min_size=1, max_size=25)):
        name = _fill(template, draw, draw(st.sampled_from(layers)), proj)
        state[name] = torch.full((6, 2) if name.endswith("qkv.weight") else (3,), float(len(state)))
    for n in draw(st.lists(st.sampled_from(layers), max_size=2, unique=True)):  # EVA q/v biases, D = 2
        state[lavis.Q_BIAS.format(n=n)] = torch.tensor([1.0, 2.0])
        state[lavis.V_BIAS.format(n=n)] = torch.tensor([3.0, 4.0])
        state[lavis.QKV_WEIGHT.replace("vision_model.encoder.layers", "visual_encoder.blocks")
              .replace("self_attn.", "attn.").format(n=n)] = torch.zeros(6, 2)
    dropped_table = lavis.DROPPED_KEYS + (() if instruct else tuple(k for k, _ in lavis.QFORMER_TEXT_KEYS))
    extra = {_fill(t, draw, draw(st.sampled_from(layers)), proj): torch.ones(1)
             for t in draw(st.lists(st.sampled_from(dropped_table), max_size=3))}
    extra.update({f"{prefix}{draw(st.sampled_from(['lm_head.weight', 'model.embed_tokens.weight']))}": torch.ones(1)
                  for prefix in draw(st.lists(st.sampled_from(lavis.LLM_PREFIXES), max_size=2))})
    return instruct, proj, state, extra


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lavis_states())
def test_key_maps_invert_on_any_valid_key_set(drawn):
    instruct, proj, state, extra = drawn
    hf, dropped = lavis.lavis_to_hf({**state, **extra}, keep_qformer_embeddings=instruct)
    assert sorted(dropped) == sorted(extra)  # dropped keys are all listed, by name
    back = lavis.hf_to_lavis(hf, projection_prefix=proj, include_vision=True)
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


_NAME_CHARS = string.ascii_letters + string.digits + "._"


@st.composite
def mutated_names(draw, names):
    """A name from ``names`` with a random edit (insert, delete or replace characters), or random text."""
    if draw(st.booleans()):
        return draw(st.text(_NAME_CHARS, min_size=1, max_size=40))
    name = draw(st.sampled_from(sorted(names)))
    i = draw(st.integers(0, len(name)))
    j = draw(st.integers(i, min(len(name), i + 3)))
    return name[:i] + draw(st.text(_NAME_CHARS, max_size=3)) + name[j:]


def _alone(function, name: str):
    """How ``function`` treats ``name`` on its own: "mapped", "dropped" or "refused"."""
    try:
        out = function(name)
    except VpgtransError as exc:
        assert name in str(exc), (name, str(exc))  # refused keys are named
        return "refused"
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lavis_states(), st.data())
def test_invalid_keys_are_reported_never_silently_dropped(drawn, data):
    instruct, proj, state, _ = drawn
    hf, _ = lavis.lavis_to_hf(state, keep_qformer_embeddings=instruct)
    bad_lavis = data.draw(mutated_names(state))
    assume("_bias" not in bad_lavis)  # q/v biases are judged in pairs

    def to_hf(name):
        mapped, dropped = lavis.lavis_to_hf({name: torch.ones(1)}, keep_qformer_embeddings=instruct)
        assert len(mapped) + len(dropped) == 1, name  # one key in, one key accounted for
        return "dropped" if dropped else "mapped"

    if _alone(to_hf, bad_lavis) == "refused" and bad_lavis not in state:
        with pytest.raises(VpgtransError) as err:
            lavis.lavis_to_hf({**state, bad_lavis: torch.ones(1)}, keep_qformer_embeddings=instruct)
        assert bad_lavis in str(err.value)

    bad_hf = data.draw(mutated_names(hf))
    assume(not bad_hf.endswith("qkv.bias") and not bad_hf.startswith("language_model."))

    def to_lavis(name):
        mapped = lavis.hf_to_lavis({name: torch.ones(1)}, projection_prefix=proj, include_vision=True)
        assert len(mapped) == 1, name
        return "mapped"

    if _alone(to_lavis, bad_hf) == "refused" and bad_hf not in hf:
        with pytest.raises(VpgtransError) as err:
            lavis.hf_to_lavis({**hf, bad_hf: torch.ones(1)}, projection_prefix=proj, include_vision=True)
        assert bad_hf in str(err.value)


unit = st.floats(0, 1, allow_nan=False)


@st.composite
def boxes(draw, positive: bool = False):
    x1, x2 = sorted((draw(unit), draw(unit)))
    y1, y2 = sorted((draw(unit), draw(unit)))
    if positive:  # an area a float can hold (below 1e-12 of an image there is no pixel anyway)
        assume((x2 - x1) * (y2 - y1) > 1e-12)
    return (x1, y1, x2, y2)


# --- the jsonl reader ----------------------------------------------------------------------------------


def _data_dir(root: Path, content: bytes) -> Path:
    Image.new("RGB", (4, 4), (9, 9, 9)).save(root / "a.png")
    (root / "data.jsonl").write_bytes(content)
    return root


def _check_reader(content: bytes) -> None:
    expected_lines = sum(1 for line in content.split(b"\n") if line.strip())
    with tempfile.TemporaryDirectory() as tmp:
        root = _data_dir(Path(tmp), content)
        try:
            dataset, task, stats = load_rows(root)
        except VpgtransError as exc:
            _one_line(exc)
            event("refused")
            return
        event(f"loaded: {stats.rows} kept of {stats.lines}" if stats.lines < 3 else "loaded: 3+ rows read")
        assert stats.lines == expected_lines
        assert stats.rows == len(dataset) >= 1
        assert stats.rows + stats.skipped_at_load == stats.lines  # kept + skipped = rows read
        assert task in ("caption", "vqa", "grounding")
        for row in dataset:
            assert Path(row["image"]).name == "a.png"


GOOD_LINE = b'{"image": "a.png", "caption": "a grey square"}'


@FAST
@given(st.binary(max_size=300) | st.lists(st.binary(max_size=30) | st.just(GOOD_LINE), max_size=10).map(b"\n".join))
def test_jsonl_reader_on_random_bytes(content):
    _check_reader(content)


row_values = {
    "image": st.sampled_from(["a.png", "missing.png", "", 3, None, ["a.png"]]),
    "caption": json_values | st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=3),
    "question": json_values | st.text(max_size=20),
    "answers": json_values | st.lists(st.text(max_size=6), max_size=4),
    "box": json_values | st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=4, max_size=4),
}
valid_rows = st.one_of(
    st.fixed_dictionaries({"image": st.just("a.png"), "caption": st.text(string.ascii_letters, min_size=1, max_size=9)}),
    st.fixed_dictionaries({"image": st.just("a.png"), "question": st.text(string.ascii_letters, min_size=1),
                           "answers": st.lists(st.text(string.ascii_letters, min_size=1), min_size=1, max_size=3)}),
    st.fixed_dictionaries({"image": st.just("a.png"), "question": st.just("the square"), "box": boxes(positive=True)}))
rows = st.one_of(json_values, st.fixed_dictionaries({}, optional=row_values), valid_rows)


@FAST
@given(st.lists(rows | st.just("") | st.binary(max_size=12), max_size=12))
def test_jsonl_reader_on_random_rows(items):
    lines = [item if isinstance(item, bytes) else item.encode() if isinstance(item, str) else json.dumps(item).encode()
             for item in items]
    lines = [line.replace(b"\n", b" ") for line in lines]
    _check_reader(b"\n".join(lines) + b"\n")


@FAST
@given(st.lists(rows, max_size=12) | json_values)
def test_lavis_annotation_reader_on_random_json(value):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)  # LAVIS's layout: annotations/ beside images/
        (root / "images").mkdir()
        (root / "annotations").mkdir()
        Image.new("RGB", (4, 4), (9, 9, 9)).save(root / "images" / "a.png")
        (root / "annotations" / "ann.json").write_text(json.dumps(value))
        try:
            dataset, task, stats = load_rows(root / "annotations" / "ann.json")
        except VpgtransError as exc:
            _one_line(exc)
            event("refused")
            return
        event("loaded")
        assert isinstance(value, list) and stats.lines == len(value)
        assert stats.rows == len(dataset) >= 1 and stats.rows + stats.skipped_at_load == stats.lines
        assert all(Path(row["image"]) == (root / "images" / "a.png").resolve() for row in dataset)


@FAST
@given(st.binary(max_size=200) | st.builds(lambda v, p: pickle.dumps(v, protocol=p), json_values, st.integers(0, 5)))
def test_refs_pickle_reader_on_random_bytes(content):
    from vpgtrans.data_convert import read_plain_pickle

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "refs(unc).p"
        path.write_bytes(content)
        try:
            value = read_plain_pickle(path)
        except VpgtransError as exc:
            _one_line(exc)
            event("refused")
            return
        event("loaded")
        assert value == pickle.loads(content)  # what loaded holds plain values only: the same as pickle's


# --- hand-edited manifests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_bundle(inherited, tmp_path_factory):
    return shutil.copytree(inherited, tmp_path_factory.mktemp("fuzz") / "bundle")


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:3]):
            yield from _paths(item, prefix + (i,))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.data())
def test_edited_manifest_is_a_one_line_error_or_valid(fuzz_bundle, inherited, data):
    from vpgtrans.bundle import MANIFEST, model_problems, validate_bundle
    from vpgtrans.inspect import inspect_path

    manifest = json.loads((inherited / MANIFEST).read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values)
    (fuzz_bundle / MANIFEST).write_text(json.dumps(manifest))
    try:
        validate_bundle(fuzz_bundle)
    except VpgtransError as exc:
        _one_line(exc)
        event("invalid")
    else:
        event("valid")
        assert model_problems(manifest) == []
    try:
        info = inspect_path(fuzz_bundle)
    except VpgtransError as exc:  # a manifest that is no vpgtrans manifest any more
        _one_line(exc)
    else:
        json.dumps(info, default=str)


# --- box text -----------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.from_regex(r"\s*[\[(]?\s*[-\d.eE+]{1,6}(\s*,\s*[-\d.eE+]{1,6}){2,4}\s*[\])]?\s*"))
def test_parse_box_never_raises(text):
    box = parse_box(text)
    if box is not None:
        x1, y1, x2, y2 = box
        assert all(0 <= v <= 1 for v in box) and x1 <= x2 and y1 <= y2


@settings(max_examples=200, deadline=None)
@given(boxes(), st.integers(1, 6), st.sampled_from(["", " ", "  "]), st.sampled_from(["()", "[]", "{}", "<>", ""]),
       st.sampled_from(["", ".", "\n###", "###junk"]))
def test_parse_box_round_trips_formatted_boxes(box, digits, space, brackets, tail):
    text = format_box(box, digits).replace(",", "," + space)
    if brackets:
        text = brackets[0] + text + brackets[1]
    parsed = parse_box(text + tail, stop="###")
    assert parsed == tuple(float(f"{v:.{digits}f}") for v in box)
    assert parse_box(",".join(repr(v) for v in box)) == box  # repr: exact


@settings(max_examples=200, deadline=None)
@given(boxes(positive=True), boxes())
def test_box_iou_properties(a, b):
    iou = box_iou(a, b)
    assert 0.0 <= iou <= 1.0 and math.isclose(iou, box_iou(b, a), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(box_iou(a, a), 1.0)


# --- safetensors headers: generated malformed headers (issue 16, item 4) -----------------------------

DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}
MUTATIONS = ["none", "size_mismatch", "overlap", "unknown_dtype", "out_of_order", "past_end", "gap", "non_dict_entry",
             "bad_offsets_type", "huge_length", "non_utf8", "not_json", "truncated", "trailing", "negative_dim"]


def _safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


@st.composite
def safetensors_files(draw):
    """(mutation, file bytes): a valid file of 1-4 tensors, then one mutation of its header or data."""
    names = draw(st.lists(st.text(string.ascii_lowercase + ".", min_size=1, max_size=8), min_size=1, max_size=4,
                          unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(1, 4), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = bytes(draw(st.integers(0, 255)) for _ in range(1)) * offset
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    mutation = draw(st.sampled_from(MUTATIONS))
    entries = [header[name] for name in names]
    first, last = entries[0], entries[-1]
    length = None
    if mutation == "size_mismatch":  # shape x dtype no longer the byte range (the file still ends where data ends)
        first["shape"] = first["shape"] + [2]
    elif mutation == "overlap":  # the second tensor's bytes start inside the first's
        if len(entries) < 2 or first["data_offsets"][1] == 0:
            mutation = "none"
        else:
            entries[1]["data_offsets"] = [entries[1]["data_offsets"][0] - 1, entries[1]["data_offsets"][1] - 1]
            data = data[:-1]
    elif mutation == "unknown_dtype":
        first["dtype"] = draw(st.sampled_from(["F128", "float32", "", "Q4", "I128"]))
    elif mutation == "out_of_order":  # a range whose end comes before its start
        start, stop = first["data_offsets"]
        if start == stop:
            mutation = "none"
        else:
            first["data_offsets"] = [stop, start]
    elif mutation == "past_end":
        last["data_offsets"] = [last["data_offsets"][0], last["data_offsets"][1] + draw(st.integers(1, 10**9))]
    elif mutation == "gap":
        for entry in entries:
            entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]
        data = b"\0" * 4 + data
    elif mutation == "non_dict_entry":
        header[names[0]] = draw(st.sampled_from([[1, 2], "F32", 3, None, {"dtype": "F32"}]))
    elif mutation == "bad_offsets_type":
        first["data_offsets"] = draw(st.sampled_from([[0], "0,4", [0.5, 4], [-4, 0], None, [4, 0]]))
    elif mutation == "negative_dim":
        first["shape"] = [-1] + first["shape"]
    elif mutation == "huge_length":
        length = draw(st.sampled_from([2**63, 2**40, 10**9, 0]))
    elif mutation == "truncated":
        data = data[:-1] if data else data
        if not data:
            length = 10**6
    elif mutation == "trailing":
        data = data + b"\0" * draw(st.integers(1, 16))
    blob = _safetensors_bytes(header, data, length)
    if mutation == "non_utf8":
        blob = blob[:8] + b"\xff\xfe" + blob[10:]
    elif mutation == "not_json":
        blob = blob[:8] + b"[" + blob[9:]
    return mutation, blob


def _readable_by_safetensors(path: Path) -> bool:
    """The owner of the format says: the file opens and every tensor reads with its header's shape."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                fh.get_tensor(name)
        return True
    except Exception:  # noqa: BLE001 - any refusal
        return False


@settings(max_examples=300, deadline=None)
@given(safetensors_files())
def test_safetensors_header_check_on_generated_malformed_headers(drawn):
    """Every mutation that breaks the format is a one-line VpgtransError naming the file; a file the check
    accepts is one safetensors itself reads whole; nothing else ever comes out."""
    from vpgtrans.formats.hf import safetensors_header

    mutation, blob = drawn
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "model.safetensors"
        path.write_bytes(blob)
        try:
            header = safetensors_header(path)
        except VpgtransError as exc:
            _one_line(exc)
            assert str(path) in str(exc)
            assert mutation != "none", str(exc)  # a sound file is never refused
            event(f"refused {mutation}")
            return
        event(f"accepted {mutation}")
        assert mutation == "none", mutation  # every mutation breaks the format
        assert _readable_by_safetensors(path)
        assert all(isinstance(entry, dict) for entry in header.values())


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a real safetensors file with ``edit(header dict, data bytes) -> file bytes``."""
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    path.write_bytes(edit(json.loads(blob[8:8 + length]), blob[8 + length:]))


def _first(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


HEADER_ATTACKS = {
    "shape x dtype != byte range": lambda h, d: (_first(h).update(shape=_first(h)["shape"] + [2]),
                                                 _safetensors_bytes(h, d))[1],
    "unknown dtype": lambda h, d: (_first(h).update(dtype="F128"), _safetensors_bytes(h, d))[1],
    "range past the end": lambda h, d: (_first(h).update(data_offsets=[0, 10**12]), _safetensors_bytes(h, d))[1],
    "huge header length": lambda h, d: _safetensors_bytes(h, d, length=2**62),
    "non-UTF-8 header": lambda h, d: (lambda b: b[:9] + b"\xff" + b[10:])(_safetensors_bytes(h, d)),
    "non-dict entry": lambda h, d: (h.update({sorted(h)[0]: [1, 2, 3]}), _safetensors_bytes(h, d))[1],
}


@pytest.mark.parametrize("attack", sorted(HEADER_ATTACKS))
def test_malformed_llm_headers_through_the_cli(tiny, tmp_path, attack):
    from typer.testing import CliRunner

    from test_cli import _run, _user_error

    llm = tmp_path / "llm"
    shutil.copytree(tiny["llama"], llm)
    _rewrite_header(llm / "model.safetensors", HEADER_ATTACKS[attack])
    _user_error(_run(CliRunner(), "inherit", "--source", tiny["source"], "--target-llm", llm, "--out",
                     tmp_path / "out"), "model.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("attack", ["shape x dtype != byte range", "unknown dtype"])
def test_malformed_bundle_headers_with_recomputed_hashes_through_the_cli(inherited, tiny, tmp_path, attack):
    from typer.testing import CliRunner

    from test_cli import _run, _user_error
    from vpgtrans.bundle import MANIFEST, file_sha256

    bundle = tmp_path / "bundle"
    shutil.copytree(inherited, bundle)
    _rewrite_header(bundle / "vpg.safetensors", HEADER_ATTACKS[attack])
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["vpg.safetensors"] = file_sha256(bundle / "vpg.safetensors")
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    for command in (["eval", bundle, "--data", tiny["caption"]], ["export", bundle, "--out", tmp_path / "out"]):
        _user_error(_run(CliRunner(), *command), "vpg.safetensors", "damaged safetensors header")
    assert not (tmp_path / "out").exists()
