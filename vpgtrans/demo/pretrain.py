"""The three short training loops behind the zoo: LM pre-training on the world corpus, vision-encoder
pre-training on world images, and the source BLIP-2's VPG training. Plain PyTorch, CPU, seeded; each
loop is written out top to bottom.
"""

from __future__ import annotations

import math
import random
import re

import torch
from torch import nn

from vpgtrans.demo import world

IGNORE_INDEX = -100


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to zero at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """[(ids, labels)] -> right-padded (input_ids, attention_mask, labels), each (B, T)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in examples])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in examples])
    return input_ids, mask, labels


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


# ------------------------------------------------------------------------------------------------ LM

def lm_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """``[context][BOS][text "\\n"]`` with labels on the text only: the MLLM layout with the soft
    prompts written out as words."""
    bos = tokenizer.bos_token_id
    examples = []
    for context, text in pairs:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        text_ids = tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        examples.append((context_ids + [bos] + text_ids, [IGNORE_INDEX] * (len(context_ids) + 1) + text_ids))
    return examples


def pretrain_lm(model, tokenizer, pairs: list[tuple[str, str]], steps: int, batch_size: int = 64,
                lr: float = 3e-3, seed: int = 0) -> float:
    """Train a causal LM on ``lm_examples``; returns the mean loss of the last 20 steps."""
    examples = lm_examples(tokenizer, pairs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = _optimizer(model.parameters(), lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(30, steps // 10 + 1))
        picks = torch.randint(len(examples), (batch_size,), generator=order).tolist()
        input_ids, mask, labels = pad_batch([examples[i] for i in picks], pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def lm_copy_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Teacher-forced accuracy on the text tokens that name an attribute (colour, shape, size,
    position): does the LM copy them from the context in front of its BOS?"""
    names = set(world.COLORS) | set(world.SHAPES) | set(world.SIZES) | set(world.POSITIONS) | {"top", "bottom"}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask, labels = pad_batch(lm_examples(tokenizer, pairs), pad_id)
    predicted = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].argmax(-1)  # (B, T-1)
    target = labels[:, 1:]
    words = {i: tokenizer.decode([i]).strip(" ?.,:") for i in set(target[target >= 0].tolist())}
    is_name = torch.tensor([[words.get(t, "") in names for t in row] for row in target.tolist()])
    return (predicted == target)[is_name].float().mean().item()


@torch.no_grad()
def lm_word_copy_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """``lm_copy_accuracy`` for an LM whose tokens can be smaller than words (a character-level one spells
    "square" over six): teacher-forced, an attribute word of the text counts as copied when every token that
    overlaps it is predicted right. Needs a fast tokenizer (character offsets)."""
    names = set(world.COLORS) | set(world.SHAPES) | set(world.SIZES) | set(world.POSITIONS) | {"top", "bottom"}
    examples = lm_examples(tokenizer, pairs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask, labels = pad_batch(examples, pad_id)
    right = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].argmax(-1) == labels[:, 1:]  # (B, T-1)
    hits = []
    for row, ((_, text), (ids, _)) in enumerate(zip(pairs, examples)):
        offsets = tokenizer(text + "\n", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        first = len(ids) - len(offsets)  # the text's first token; right[:, i - 1] scores the token at i
        for word in re.finditer(r"[a-z]+(?:-[a-z]+)*", text):
            if word.group() in names:
                inside = [first + j - 1 for j, (a, b) in enumerate(offsets) if a < word.end() and b > word.start()]
                hits.append(bool(right[row, inside].all()))
    return sum(hits) / len(hits)


# -------------------------------------------------------------------------------------------- vision

def vision_dataset(n: int, seed: int, image_size: int, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` one-object world images -> (pixel_values (n, 3, S, S), attribute labels (n, 4))."""
    rng = random.Random(f"vpgtrans-vision:{seed}")
    vocabularies = [tuple(world.COLORS), world.SHAPES, tuple(world.SIZES), world.POSITIONS]
    images, labels = [], []
    for _ in range(n):
        scene = world.sample_scene(rng, max_objects=1)
        images.append(world.render_scene(scene, image_size))
        obj = scene["objects"][0]
        labels.append([vocab.index(obj[a]) for vocab, a in zip(vocabularies, world.ATTRIBUTES)])
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values, torch.tensor(labels)


def pretrain_vision(vision, pixel_values: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int = 64,
                    lr: float = 3e-3, seed: int = 0, eval_count: int = 200) -> dict:
    """Pre-train a ``Blip2VisionModel`` with two throw-away heads: the object's attributes from the
    [CLS] token, and each patch's mean colour from its own token (a generic, dense target
    that keeps spatial detail in the patch tokens the Q-Former reads). The last ``eval_count`` images
    are held out; returns their per-attribute accuracy."""
    sizes = [len(world.COLORS), len(world.SHAPES), len(world.SIZES), len(world.POSITIONS)]
    width = vision.config.hidden_size
    patch = vision.config.patch_size
    attribute_head = nn.Linear(width, sum(sizes))
    colour_head = nn.Linear(width, 3)
    train_x, train_y = pixel_values[:-eval_count], labels[:-eval_count]
    modules = nn.ModuleList([vision, attribute_head, colour_head])
    optimizer = _optimizer(modules.parameters(), lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)

    def heads(x):
        tokens = vision(pixel_values=x).last_hidden_state  # (B, 1 + P, D), after post_layernorm
        logits = attribute_head(tokens[:, 0]).split(sizes, dim=-1)  # from [CLS]: 4 x (B, n_values)
        return logits, colour_head(tokens[:, 1:])  # (B, P, 3)

    modules.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=20)
        picks = torch.randint(len(train_x), (batch_size,), generator=order)
        x, y = train_x[picks], train_y[picks]
        logits, colours = heads(x)
        patch_colour = nn.functional.avg_pool2d(x, patch).flatten(2).transpose(1, 2)  # (B, P, 3)
        loss = sum(nn.functional.cross_entropy(l, y[:, i]) for i, l in enumerate(logits))
        loss = loss + nn.functional.mse_loss(colours, patch_colour)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    modules.eval()
    with torch.no_grad():
        logits, _ = heads(pixel_values[-eval_count:])
    truth = labels[-eval_count:]
    return {a: (l.argmax(-1) == truth[:, i]).float().mean().item()
            for i, (a, l) in enumerate(zip(world.ATTRIBUTES, logits))}


def generic_vision_dataset(n: int, seed: int, image_size: int, image_processor) -> torch.Tensor:
    """``n`` world images with 0..4 objects and no labels: (n, 3, S, S) pixel values."""
    rng = random.Random(f"vpgtrans-vision-generic:{seed}")
    images = []
    for _ in range(n):
        scene = world.sample_scene(rng, max_objects=4) if rng.random() < 0.95 else \
            {"background": rng.randint(0, 50), "objects": []}
        images.append(world.render_scene(scene, image_size))
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def pretrain_vision_generic(vision, pixel_values: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3,
                            mask_ratio: float = 0.25, seed: int = 0, eval_count: int = 200) -> dict:
    """Pre-train a ``Blip2VisionModel`` as a masked patch autoencoder: a quarter of the patches are
    blanked, and every patch token must give back its patch's pixels (a throw-away linear head).

    Nothing here names a colour, a shape or a position: the encoder learns generic, dense appearance
    features, and turning them into the words of a caption is left to the VPG (DESIGN §5). The last
    ``eval_count`` images are held out; returns their reconstruction error (MSE, all and masked patches)
    next to the error of predicting each patch's mean (the baseline a useless encoder reaches).
    """
    patch = vision.config.patch_size
    grid = vision.config.image_size // patch
    head = nn.Linear(vision.config.hidden_size, 3 * patch * patch)
    train_x = pixel_values[:-eval_count]
    modules = nn.ModuleList([vision, head])
    optimizer = _optimizer(modules.parameters(), lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)

    def patches(x):  # (B, 3, S, S) -> (B, P, 3 * patch * patch), P in raster order like the ViT's tokens
        return nn.functional.unfold(x, patch, stride=patch).transpose(1, 2)

    def masked_loss(x, generator):
        keep = (torch.rand(x.shape[0], 1, grid, grid, generator=generator) >= mask_ratio).float()
        blanked = x * nn.functional.interpolate(keep, scale_factor=patch)  # 0 = the dataset mean colour
        predicted = head(vision(pixel_values=blanked).last_hidden_state[:, 1:])  # (B, P, 3 * patch^2)
        error = ((predicted - patches(x)) ** 2).mean(-1)  # (B, P)
        masked = 1 - keep.flatten(1)
        return error.mean(), (error * masked).sum() / masked.sum().clamp(min=1)

    modules.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=20)
        x = train_x[torch.randint(len(train_x), (batch_size,), generator=order)]
        loss, _ = masked_loss(x, order)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    modules.eval()
    held = pixel_values[-eval_count:]
    with torch.no_grad():
        mse, masked_mse = masked_loss(held, torch.Generator().manual_seed(seed + 1))
        target = patches(held)
        baseline = ((target - target.mean(-1, keepdim=True)) ** 2).mean()
    return {"mse": mse.item(), "masked_mse": masked_mse.item(), "patch_mean_mse": baseline.item()}


# ------------------------------------------------------------------------------------------- source

def set_vpg_trainable(model) -> tuple[int, int]:
    """Freeze a ``Blip2ForConditionalGeneration`` except its VPG (post-ViT LayerNorm, query tokens,
    Q-Former) and ``language_projection``; returns (trainable, frozen) parameter counts."""
    trainable_prefixes = ("vision_model.post_layernorm.", "query_tokens", "qformer.", "language_projection.")
    counts = [0, 0]
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trainable_prefixes)
        counts[not param.requires_grad] += param.numel()
    return counts[0], counts[1]


@torch.no_grad()
def vision_features(vision, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Frozen-ViT features *before* its final LayerNorm (that one is the VPG's): (N, 1 + P, D)."""
    chunks = []
    for start in range(0, len(pixel_values), batch_size):
        embeddings = vision.embeddings(pixel_values[start:start + batch_size])
        chunks.append(vision.encoder(inputs_embeds=embeddings).last_hidden_state)
    return torch.cat(chunks)


def soft_prompts(model, features: torch.Tensor) -> torch.Tensor:
    """Pre-LN ViT features (B, N, D_vit) -> projected query outputs (B, K, D_llm), as BLIP-2 computes them."""
    image_embeds = model.vision_model.post_layernorm(features)
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
    return model.language_projection(out.last_hidden_state)


def train_source(model, features: torch.Tensor, examples: list[tuple[int, list[int], list[int]]], pad_id: int,
                 steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, on_step=None) -> float:
    """Train the VPG and projector of a ``Blip2ForConditionalGeneration`` with ViT and LLM frozen.

    ``examples``: (feature row, input_ids with ``config.image_token_id`` in the K image slots, labels).
    ``on_step(step, loss)`` (optional) is called after each optimizer step, e.g. to evaluate on the
    way. Returns the mean loss of the last 20 steps.
    """
    set_vpg_trainable(model)
    image_token = model.config.image_token_id
    embed = model.language_model.get_input_embeddings()
    optimizer = _optimizer(model.parameters(), lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=30)
        picks = torch.randint(len(examples), (batch_size,), generator=order).tolist()
        rows = torch.tensor([examples[i][0] for i in picks])
        input_ids, mask, labels = pad_batch([examples[i][1:] for i in picks], pad_id)
        prompts = soft_prompts(model, features[rows])  # (B, K, D_llm)
        slots = (input_ids == image_token).unsqueeze(-1)  # (B, T, 1)
        inputs_embeds = embed(input_ids).masked_scatter(slots, prompts)
        loss = model.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])
