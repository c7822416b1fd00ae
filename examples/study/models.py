"""Tokenizer, the text-only backbone, the vision tower and the LLaVA-style MLLM, all built locally.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over the generator's
vocabulary, wrapped as a ``PreTrainedTokenizerFast``; the models are transformers config classes
with random weights, then pretrained here:

- the **backbone** (a Llama) is pretrained text-only on the training conversations with every
  visual token replaced by the pad token (the teacher's view of a sample): it learns the language,
  the templates and which answer words it cannot know;
- the **vision tower** (CLIP) is pretrained to name each cell's colour, shape and size from its
  patch, as a real MLLM starts from a pretrained vision encoder;
- the **MLLM** (``LlavaForConditionalGeneration``) = that vision tower (frozen, as in LLaVA's
  instruction tuning) + a fresh projector + that backbone. The frozen initial backbone is also the
  ReGATE teacher (``regate_fx.text_only_teacher``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf

from . import data as D

PAD, BOS, EOS, UNK, IMAGE_TOKEN, USER, ASSISTANT = range(7)
NUM_PATCHES = D.GRID * D.GRID


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(D.SPECIAL)}
    for w in D.vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        additional_special_tokens=["<image>", "<user>", "<assistant>"])


def encode(sample: D.Sample, tok, sample_id: int) -> dict:
    """One sample as the runtime reads it, plus ``pixel_values`` and per-token ``tags``.

    Layout: ``[BOS] <image> x 9 (<user> question <assistant> answer [EOS])...``; labels are the
    answer words and each answer's [EOS] (-100 elsewhere). ``tags[p]`` is the tag of token ``p``
    (0 = not an answer word, ``D.TEXT`` or ``D.IMAGE``); ``[EOS]`` is TEXT.
    """
    words, sup, tags = ["[BOS]"] + ["<image>"] * NUM_PATCHES, [False] * (1 + NUM_PATCHES), [0] * (1 + NUM_PATCHES)
    for q, a in sample.turns:
        words += ["<user>", *q, "<assistant>"]
        sup += [False] * (len(q) + 2)
        tags += [0] * (len(q) + 2)
        words += [w for w, _ in a] + ["[EOS]"]
        sup += [True] * (len(a) + 1)
        tags += [t for _, t in a] + [D.TEXT]
    ids = torch.tensor(tok.convert_tokens_to_ids(words), dtype=torch.long)
    assert int((ids == UNK).sum()) == 0, "a generated word is missing from the vocabulary"
    labels = ids.masked_fill(~torch.tensor(sup), -100)
    return {"input_ids": ids, "labels": labels, "sample_id": sample_id,
            "pixel_values": torch.from_numpy(sample.pixels), "tags": torch.tensor(tags, dtype=torch.int8)}


# --------------------------------------------------------------------------- configs
@dataclass
class ModelSize:
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 512
    vision_hidden: int = 64
    vision_layers: int = 2


def llama_config(vocab: int, size: ModelSize) -> tf.LlamaConfig:
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def clip_config(size: ModelSize) -> tf.CLIPVisionConfig:
    cfg = tf.CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
                              num_hidden_layers=size.vision_layers, num_attention_heads=4,
                              image_size=D.IMAGE_SIZE, patch_size=D.CELL, projection_dim=size.vision_hidden)
    cfg._attn_implementation = "sdpa"
    return cfg


# --------------------------------------------------------------------------- pretraining
def _batches(n: int, bs: int, steps: int, g: torch.Generator):
    order: list[int] = []
    for _ in range(steps):
        if len(order) < bs:
            order += torch.randperm(n, generator=g).tolist()
        yield order[:bs]
        order = order[bs:]


def pretrain_backbone(train: list[dict], vocab: int, size: ModelSize, steps: int, seed: int,
                      lr: float = 3e-3, bs: int = 32, log=print) -> tf.LlamaForCausalLM:
    """Text-only LM on the training conversations (visual tokens -> pad, not predicted).

    Loss on every text token after the image (questions and answers), as a language model
    pretrained on the captions would be; the image positions are the teacher's placeholders.
    """
    torch.manual_seed(seed)
    lm = tf.LlamaForCausalLM(llama_config(vocab, size)).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step, idx in enumerate(_batches(len(train), bs, steps, g)):
        ids, am = _pad([train[i]["input_ids"] for i in idx])
        x = ids.masked_fill(ids == IMAGE_TOKEN, PAD)
        labels = x.masked_fill(am == 0, -100).masked_fill(x == PAD, -100)
        loss = lm(input_ids=x, attention_mask=am, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"  backbone step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
    return lm.eval()


class CellProbe(torch.nn.Module):
    """Per-patch heads (colour, shape, size, each with 'empty') used to pretrain the vision tower."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(D.COLOURS) + 1)
        self.shape = torch.nn.Linear(hidden, len(D.SHAPES) + 1)
        self.size = torch.nn.Linear(hidden, len(D.SIZES) + 1)


def cell_targets(sample: D.Sample) -> torch.Tensor:
    t = torch.zeros(NUM_PATCHES, 3, dtype=torch.long)  # 0 = empty
    for o in sample.objects:
        t[o.cell] = torch.tensor([list(D.COLOURS).index(o.colour) + 1, D.SHAPES.index(o.shape) + 1,
                                  D.SIZES.index(o.size) + 1])
    return t


def pretrain_vision(samples: list[D.Sample], size: ModelSize, steps: int, seed: int, bs: int = 64,
                    lr: float = 3e-3, log=print) -> tuple[tf.CLIPVisionModel, float]:
    """CLIP tower trained to name every cell from its patch (the layer LLaVA reads: the last)."""
    torch.manual_seed(seed)
    tower = tf.CLIPVisionModel(clip_config(size)).train()
    probe = CellProbe(size.vision_hidden)
    params = list(tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pix = torch.stack([torch.from_numpy(s.pixels) for s in samples])
    tgt = torch.stack([cell_targets(s) for s in samples])
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()

    def run(idx):
        h = tower(pixel_values=pix[idx], output_hidden_states=True).hidden_states[-1][:, 1:]  # (B, 9, H)
        outs = (probe.colour(h), probe.shape(h), probe.size(h))
        loss = sum(F.cross_entropy(o.flatten(0, 1), tgt[idx][..., k].flatten()) for k, o in enumerate(outs))
        acc = torch.stack([(o.argmax(-1) == tgt[idx][..., k]) for k, o in enumerate(outs)]).all(0).float().mean()
        return loss, float(acc)

    for step, idx in enumerate(_batches(len(samples), bs, steps, g)):
        loss, acc = run(idx)
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"  vision step {step:4d}  loss {loss.item():.3f}  cell acc {acc:.2f}  ({time.perf_counter() - t0:.0f} s)")
    return tower.eval(), acc


def build_mllm(backbone: tf.LlamaForCausalLM, tower: tf.CLIPVisionModel, size: ModelSize, seed: int,
               freeze_vision: bool = True) -> tf.LlavaForConditionalGeneration:
    """LLaVA = pretrained tower + fresh projector (seeded) + a copy of the pretrained backbone."""
    cfg = tf.LlavaConfig(vision_config=tower.config, text_config=backbone.config, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    m = tf.LlavaForConditionalGeneration(cfg)
    m.model.vision_tower.load_state_dict(tower.state_dict())
    m.model.language_model.load_state_dict(backbone.model.state_dict())
    m.lm_head.load_state_dict(backbone.lm_head.state_dict())
    if freeze_vision:
        m.model.vision_tower.requires_grad_(False)
    return m


def _pad(seqs: list[torch.Tensor], value: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : s.numel()] = s
        am[b, : s.numel()] = 1
    return ids, am
