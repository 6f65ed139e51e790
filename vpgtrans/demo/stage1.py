"""BLIP-2's first-stage pre-training of a Q-Former on the demo world, without any LLM: the start of the
paper's train-from-scratch (TFS) baseline (DESIGN §7: "starts from a Q-Former that had BLIP-2's first-stage
pre-training (image-text contrastive, matching and image-grounded generation, no LLM)").

The model is transformers' ``Blip2ForImageTextRetrieval`` (frozen ViT + trainable ``post_layernorm``,
queries and Q-Former, text embeddings, the two contrastive projections and the matching head). One
training step is LAVIS's ``Blip2Qformer.forward`` without its generation loss:

- **ITC** (image-text contrastive): each query's output -> ``vision_projection``, L2-normalised; the
  text's first-token output -> ``text_projection``, L2-normalised; an image-text similarity is the
  maximum over the queries, divided by a temperature (0.07, LAVIS's initial value; fixed here);
  symmetric cross-entropy over the batch, label smoothing 0.1 as LAVIS.
- **ITM** (image-text matching): queries and text through the Q-Former together (the text attends to the
  queries, the queries cross-attend to the image); ``itm_head`` on the query outputs, averaged; positive
  pairs and, for each image and each text, one hard negative drawn in proportion to the ITC similarity
  (LAVIS's sampling; pairs with the same caption are never drawn as negatives).
- **Not done: ITG** (image-grounded generation), BLIP-2's third loss: ``Blip2ForImageTextRetrieval`` has
  no language-modelling head on the Q-Former, and transformers offers no BLIP-2 stage-1 model that has one.

BLIP-2 starts the Q-Former from BERT-base; this one starts random, and in trial runs its ITM loss stayed at
the prior (the text barely moves the query outputs at init) while ITC learned: the records keep both losses.

The text is tokenised with the world's OPT-style tokenizer, its BOS in front as the [CLS] position.
``retrieval_accuracy`` scores image -> text top-1 retrieval on held-out pairs by the ITC similarity.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vpgtrans.demo.pretrain import _optimizer, cosine_lr, vision_features

TEMPERATURE = 0.07
EMBED_DIM = 32  # ITC embedding width (BLIP-2: 256 for a 768-wide Q-Former)
MAX_TEXT_LEN = 48  # BOS + a three-object caption (~30 tokens)


def stage1_model(vision, tokenizer, qformer: dict, num_query_tokens: int, seed: int):
    """A ``Blip2ForImageTextRetrieval`` holding ``vision`` weight for weight, the Q-Former sized by ``qformer``,
    its text vocabulary ``tokenizer``'s; trainable parts initialised from ``seed``."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    qformer_config = dict(qformer, encoder_hidden_size=vision.config.hidden_size, vocab_size=len(tokenizer),
                          use_qformer_text_input=True,  # the text feed-forward blocks ITC and ITM need
                          pad_token_id=tokenizer.pad_token_id, max_position_embeddings=MAX_TEXT_LEN)
    config = Blip2Config(vision_config=vision.config.to_dict(), qformer_config=qformer_config,
                         num_query_tokens=num_query_tokens, image_text_hidden_size=EMBED_DIM)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config)
    model.vision_model.load_state_dict(vision.state_dict())
    with torch.no_grad():  # HF initialises the queries to zeros: a dead VPG
        model.query_tokens.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed + 1))
    return model


def set_stage1_trainable(model) -> tuple[int, int]:
    """Everything but the ViT's embeddings and encoder trains; returns (trainable, frozen) counts."""
    counts = [0, 0]
    for name, param in model.named_parameters():
        param.requires_grad = not name.startswith(("vision_model.embeddings.", "vision_model.encoder."))
        counts[not param.requires_grad] += param.numel()
    return counts[0], counts[1]


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS] + caption tokens, right-padded: (input_ids, attention_mask), each (N, T <= MAX_TEXT_LEN)."""
    rows = [[tokenizer.bos_token_id] + tokenizer(c, add_special_tokens=False)["input_ids"][:MAX_TEXT_LEN - 1]
            for c in captions]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return input_ids, mask


def _image_embeds(model, features: torch.Tensor) -> torch.Tensor:
    """Pre-LN ViT features (B, N, D_vit) -> the queries' outputs (B, Q, D_q)."""
    image = model.vision_model.post_layernorm(features)
    queries = model.query_tokens.expand(image.shape[0], -1, -1)
    mask = torch.ones(image.shape[:-1], dtype=torch.long)
    return model.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask).last_hidden_state


def itc_similarity(model, features: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image-text similarity (B_img, B_txt): max over queries of the cosine of the projected embeddings."""
    image = nn.functional.normalize(model.vision_projection(_image_embeds(model, features)), dim=-1)  # (B, Q, E)
    text_out = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                             attention_mask=mask).last_hidden_state
    text = nn.functional.normalize(model.text_projection(text_out[:, 0]), dim=-1)  # (B_txt, E)
    return torch.einsum("iqe,te->itq", image, text).max(-1).values


def itm_logits(model, features: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Matching logits (B, 2) of image i with text i: queries + text through the Q-Former together."""
    image = model.vision_model.post_layernorm(features)
    queries = model.query_tokens.expand(image.shape[0], -1, -1)
    embeds = model.embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q + T, D_q)
    full_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=mask.dtype), mask], dim=1)
    out = model.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=full_mask,
                        encoder_hidden_states=image,
                        encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long)).last_hidden_state
    return model.itm_head(out[:, :queries.shape[1]]).mean(1)


def stage1_losses(model, features, input_ids, mask, caption_ids: torch.Tensor, generator) -> tuple[torch.Tensor, ...]:
    """(ITC loss, ITM loss) of one batch; ``caption_ids`` (B,) names identical captions (never negatives)."""
    sim = itc_similarity(model, features, input_ids, mask) / TEMPERATURE  # (B, B)
    targets = torch.arange(len(sim))
    itc = (nn.functional.cross_entropy(sim, targets, label_smoothing=0.1)
           + nn.functional.cross_entropy(sim.T, targets, label_smoothing=0.1)) / 2
    same = caption_ids[:, None] == caption_ids[None, :]  # (B, B) positives, the diagonal included
    with torch.no_grad():
        weights_i2t = (sim.softmax(1) + 1e-4).masked_fill(same, 0)
        weights_t2i = (sim.T.softmax(1) + 1e-4).masked_fill(same, 0)
    has_negative = ~same.all(1)  # a batch of one caption repeated has no negative to draw
    neg_text = torch.multinomial(weights_i2t[has_negative], 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i[has_negative], 1, generator=generator).squeeze(1)
    rows = has_negative.nonzero().squeeze(1)
    all_features = torch.cat([features, features[neg_image], features[rows]])
    all_ids = torch.cat([input_ids, input_ids[rows], input_ids[neg_text]])
    all_mask = torch.cat([mask, mask[rows], mask[neg_text]])
    labels = torch.cat([torch.ones(len(features), dtype=torch.long), torch.zeros(2 * len(rows), dtype=torch.long)])
    itm = nn.functional.cross_entropy(itm_logits(model, all_features, all_ids, all_mask), labels)
    return itc, itm


@torch.no_grad()
def retrieval_accuracy(model, features: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Image -> text top-1 retrieval among the given pairs by ITC similarity (chance: 1 / N). A caption
    identical to the true one counts as a hit."""
    model.eval()
    sim = itc_similarity(model, features, input_ids, mask)
    picked = sim.argmax(1)
    return (input_ids[picked] == input_ids).all(1).float().mean().item()


def pretrain_stage1(model, tokenizer, pixel_values: torch.Tensor, captions: list[str], steps: int,
                    batch_size: int = 64, lr: float = 1e-3, seed: int = 0, eval_count: int = 200,
                    eval_every: int = 0, log=None) -> dict:
    """Train ``model`` (``stage1_model``) with ITC + ITM on (image, caption) pairs; the last ``eval_count``
    pairs are held out. Returns held-out retrieval accuracy (and its curve when ``eval_every``), chance,
    the last 20 steps' mean losses."""
    set_stage1_trainable(model)
    features = vision_features(model.vision_model, pixel_values)  # frozen ViT, once: (N, 1 + P, D_vit)
    input_ids, mask = tokenize(tokenizer, captions)
    caption_ids = torch.tensor([hash(c) for c in captions])  # equal captions, equal ids
    n_train = len(captions) - eval_count
    held = (features[n_train:], input_ids[n_train:], mask[n_train:])
    optimizer = _optimizer(model.parameters(), lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    losses, curve = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        model.train()
        picks = torch.randperm(n_train, generator=order)[:batch_size]
        width = int(mask[picks].sum(1).max())
        itc, itm = stage1_losses(model, features[picks], input_ids[picks, :width], mask[picks, :width],
                                 caption_ids[picks], order)
        (itc + itm).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((itc.item(), itm.item()))
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            curve.append({"step": step + 1, "retrieval_top1": round(retrieval_accuracy(model, *held), 4)})
            if log is not None:
                log(f"stage-1 Q-Former: step {step + 1}/{steps}, itc {itc.item():.3f}, itm {itm.item():.3f}, "
                    f"held-out retrieval {curve[-1]['retrieval_top1']:.3f}")
    model.eval()
    last = losses[-20:]
    return {"retrieval_top1": retrieval_accuracy(model, *held), "chance": 1 / eval_count, "heldout_pairs": eval_count,
            "itc_loss": sum(a for a, _ in last) / len(last), "itm_loss": sum(b for _, b in last) / len(last),
            "steps": steps, "samples": steps * batch_size, "curve": curve}


def to_source(model, llm, source_tokenizer, seed: int, num_query_tokens: int, qformer: dict):
    """A ``Blip2ForConditionalGeneration`` (the zoo's source layout) whose VPG (``post_layernorm``, queries,
    Q-Former) is the stage-1 model's and whose projector is fresh: what ``vpgtrans inherit`` reads with
    ``--converter none`` to connect a stage-1 Q-Former to a target LLM."""
    from vpgtrans.demo import zoo_parts

    source = zoo_parts.new_source(model.vision_model, llm, source_tokenizer, seed, num_query_tokens, qformer)
    source.vision_model.load_state_dict(model.vision_model.state_dict())
    # The text feed-forward blocks serve only the text (BLIP-2's generative models drop them, DESIGN §3).
    text_ffn = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")
    state = {k: v for k, v in model.qformer.state_dict().items() if not text_ffn.match(k)}
    source.qformer.load_state_dict(state)  # strict: every other tensor has its place
    with torch.no_grad():
        source.query_tokens.copy_(model.query_tokens)
    return source
