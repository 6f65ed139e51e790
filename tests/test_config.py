"""Configs round-trip to JSON, refuse unknown keys by name and report every invalid value at once."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpgtrans.config import InheritConfig, PromptTemplate, TrainConfig, from_dict, replace, to_dict
from vpgtrans.errors import VpgtransError


def _json_round_trip(config):
    return from_dict(type(config), json.loads(json.dumps(to_dict(config))))


@pytest.mark.parametrize("config", [
    TrainConfig(),
    TrainConfig.warmup(max_steps=3, batch_size=4),
    TrainConfig.finetune(max_samples=100, batch_size=6, grad_accum=3, eval_every=2, betas=(0.8, 0.95)),
    TrainConfig(choice_answer="text", choice_scoring="likelihood"),
    InheritConfig(),
    InheritConfig(converter="none", ridge=0.5, heldout_fraction=0.2, lowercase_fallback=False, seed=3),
    PromptTemplate(),
    PromptTemplate.for_llm(is_encoder_decoder=True),
    PromptTemplate(caption="{bos}###Human: <Img>{image}</Img> Describe. ###Assistant: ",
                   vqa="{bos}###Human: <Img>{image}</Img> {question} ###Assistant: ", target_suffix="###", stop="###"),
])
def test_round_trip(config):
    again = _json_round_trip(config)
    assert again == config
    assert type(again) is type(config)


def test_betas_come_back_as_a_tuple():
    again = _json_round_trip(TrainConfig(betas=(0.9, 0.95)))
    assert again.betas == (0.9, 0.95) and isinstance(again.betas, tuple)


def test_recipes():
    warmup, finetune = TrainConfig.warmup(), TrainConfig.finetune()
    assert (warmup.lr, warmup.min_lr, warmup.trainable) == (5e-4, None, ["connector"])
    assert (finetune.lr, finetune.min_lr, finetune.trainable) == (1e-4, 5e-5, ["vpg", "connector"])
    assert TrainConfig.warmup(lr=1e-3).lr == 1e-3


def test_unknown_keys_are_all_listed():
    data = {**to_dict(TrainConfig()), "learning_rate": 1e-4, "batchsize": 3}
    with pytest.raises(VpgtransError) as err:
        from_dict(TrainConfig, data)
    message = str(err.value)
    assert "batchsize" in message and "learning_rate" in message
    assert "TrainConfig" in message
    with pytest.raises(VpgtransError, match="convertor"):
        from_dict(InheritConfig, {"convertor": "none"})
    with pytest.raises(VpgtransError, match="image_slot"):
        from_dict(PromptTemplate, {"image_slot": "<img>"})


def test_not_an_object_is_refused():
    with pytest.raises(VpgtransError, match="expected a JSON object"):
        from_dict(TrainConfig, [1, 2])


def test_invalid_train_values_reported_together():
    with pytest.raises(VpgtransError) as err:
        TrainConfig(lr=0.0, batch_size=6, grad_accum=4, max_steps=0, epochs=-1, trainable=["llm"])
    message = str(err.value)
    for expected in ("lr must be a finite number > 0", "batch_size 6 must be divisible by grad_accum 4",
                     "max_steps must be >= 1", "epochs must be a finite number > 0", "trainable parts"):
        assert expected in message, expected


@pytest.mark.parametrize("kwargs, expected", [
    ({"lr": -1e-4}, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"min_lr": 1e-3}, "min_lr must be in [0, lr]"),
    ({"batch_size": 0}, "batch_size and grad_accum must be >= 1"),
    ({"batch_size": 8, "grad_accum": 3}, "divisible"),
    ({"eval_every": 0}, "eval_every must be >= 1"),
    ({"max_samples": 0}, "max_samples must be >= 1"),
    ({"trainable": []}, "non-empty"),
    ({"choice_answer": "Letter"}, "choice_answer must be one of letter, text (got 'Letter')"),
])
def test_invalid_train_value(kwargs, expected):
    with pytest.raises(VpgtransError, match="training config") as err:
        TrainConfig(**kwargs)
    assert expected in str(err.value)


def test_replace_revalidates():
    with pytest.raises(VpgtransError, match="divisible"):
        replace(TrainConfig(batch_size=8), grad_accum=3)


def test_from_dict_validates_values():
    with pytest.raises(VpgtransError, match="lr must be a finite number > 0"):
        from_dict(TrainConfig, {"lr": 0})


def test_template_problems_reported_together():
    with pytest.raises(VpgtransError) as err:
        PromptTemplate(caption="a photo of", vqa="Question: Answer:")
    message = str(err.value)
    assert "'caption'" in message and "'vqa'" in message and "{question}" in message


@pytest.mark.parametrize("kwargs", [
    {"caption": "no image here"},
    {"caption": "{image}{image}"},
    {"vqa": "{image} Answer:"},
    {"vqa": "Question: {question} Answer:"},
])
def test_invalid_template(kwargs):
    with pytest.raises(VpgtransError, match="prompt template"):
        PromptTemplate(**kwargs)


def test_invalid_inherit_values_reported_together():
    with pytest.raises(VpgtransError) as err:
        InheritConfig(converter="bogus", ridge=-1, heldout_fraction=0.7)
    message = str(err.value)
    assert "converter" in message and "ridge" in message and "heldout_fraction" in message


# --- property: any valid config survives to_dict -> JSON -> from_dict -------------------------------

floats = st.floats(min_value=1e-8, max_value=10, allow_nan=False, allow_infinity=False)
optional_count = st.none() | st.integers(min_value=1, max_value=10**6)


@st.composite
def train_configs(draw):
    lr = draw(floats)
    grad_accum = draw(st.integers(1, 8))
    return TrainConfig(
        lr=lr,
        min_lr=draw(st.none() | st.floats(min_value=0, max_value=lr)),
        warmup_steps=draw(st.integers(0, 1000)),
        weight_decay=draw(st.floats(0, 1)),
        betas=draw(st.tuples(st.floats(0, 0.999), st.floats(0, 0.9999))),
        epochs=draw(floats),
        max_steps=draw(optional_count),
        max_samples=draw(optional_count),
        batch_size=grad_accum * draw(st.integers(1, 64)),
        grad_accum=grad_accum,
        seed=draw(st.integers(0, 2**31)),
        max_text_len=draw(st.integers(1, 512)),
        eval_every=draw(optional_count),
        eval_max_samples=draw(st.integers(1, 10_000)),
        max_new_tokens=draw(st.integers(1, 100)),
        trainable=draw(st.sampled_from([["connector"], ["vpg"], ["vpg", "connector"], ["connector", "vpg"]])),
        log_every=draw(st.integers(1, 100)),
    )


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20).filter(
    lambda s: "{image}" not in s and "{question}" not in s)


@st.composite
def templates(draw):
    return PromptTemplate(
        caption=draw(text) + "{image}" + draw(text),
        vqa=draw(text) + "{image}" + draw(text) + "{question}" + draw(text),
        target_suffix=draw(text),
        stop=draw(text),
    )


inherit_configs = st.builds(
    InheritConfig,
    converter=st.sampled_from(["shared-tokens", "none"]),
    ridge=st.floats(0, 100),
    heldout_fraction=st.floats(0.01, 0.49),
    lowercase_fallback=st.booleans(),
    seed=st.integers(0, 2**31),
)


@settings(max_examples=60, deadline=None)
@given(st.one_of(train_configs(), templates(), inherit_configs))
def test_round_trip_property(config):
    assert _json_round_trip(config) == config
