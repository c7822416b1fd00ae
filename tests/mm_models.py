"""The multimodal coverage matrix (PEFT style): one table of tiny random-weight MLLMs.

Each entry builds a model from the installed transformers' config classes (nothing is downloaded:
hidden size 32, 2 decoder layers, a 1-layer vision tower, 8-16 pixel images) and knows how to lay
out its visual inputs: the pixel tensors, how many placeholder tokens each image or video takes,
the markers around them and the family's token-type ids. `make_mm_batch` turns that into a padded
batch, and every generic test in `tests/test_mm_matrix.py` runs over this table.

An entry with `refusal` set is expected to be refused with that reason (the text must appear in
the `RewriteError`); everything else must match `regate_fx.oracle` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers as tf

VOCAB = 128
PAD = 0
TEXT = (3, 100)  # text token ids are drawn from [3, 100)
IMAGE, VIDEO, BOI, EOI, VSTART, VEND = 127, 126, 125, 124, 123, 122

TEXT_KW = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
               bos_token_id=1, eos_token_id=2)


@dataclass
class Media:
    """The visual inputs of one batch: model inputs and, per sample, the placeholder runs."""

    inputs: dict[str, Any]
    runs: list[list[list[int]]]  # runs[b] = token runs (marker + placeholders + marker) of sample b
    kinds: list[list[str]]  # "image" / "video" of each run


@dataclass(frozen=True)
class MMFamily:
    """One row of the matrix.

    Attributes:
        name: the family.
        build: attention implementation -> model (random weights, eval mode is set by the caller).
        media: (model, generator, items) -> Media, where items[b] lists "image" / "video" per sample.
        kinds: what the family takes: "image", "images" (several per sample), "video".
        type_ids: name of the per-token modality input the family needs ('mm_token_type_ids',
            'token_type_ids'), filled from the placeholder runs.
        refusal: None when exact is expected; else a text the RewriteError must contain.
        slow: only in the slow run.
    """

    name: str
    build: Callable[[str], torch.nn.Module]
    media: Callable[[torch.nn.Module, torch.Generator, list[list[str]]], Media]
    kinds: tuple[str, ...] = ("image", "images")
    attns: tuple[str, ...] = ("sdpa", "eager")
    type_ids: str | None = None
    refusal: str | None = None
    slow: bool = False
    note: str = ""

    def __call__(self, attn: str = "sdpa") -> torch.nn.Module:
        torch.manual_seed(0)
        model = self.build(attn).eval()
        return model

    def __repr__(self) -> str:
        return self.name


def _attn(cfg, attn: str):
    cfg._attn_implementation = attn
    for name in ("text_config", "vision_config"):
        sub = getattr(cfg, name, None)
        if sub is not None:
            sub._attn_implementation = attn
    return cfg


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _runs(items: list[list[str]], per_item: Callable[[str], list[int]]) -> list[list[list[int]]]:
    return [[per_item(k) for k in row] for row in items]


def _count(items: list[list[str]], kind: str) -> int:
    return sum(k == kind for row in items for k in row)


# --- families ---------------------------------------------------------------------------------

def _qwen_vision(**kw):
    return {**dict(depth=1, hidden_size=32, num_heads=4, in_channels=3, patch_size=2, spatial_merge_size=2,
                   temporal_patch_size=2), **kw}


def _qwen_text(**kw):
    return dict(TEXT_KW, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                **kw)


_QWEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
_QWEN_IMAGE_GRID, _QWEN_VIDEO_GRID = (1, 4, 4), (2, 4, 4)  # (t, h, w) patches: 4 and 8 tokens


def _qwen_media(model, g, items, frames_apart: bool = False) -> Media:
    patch = 3 * 2 * 2 * 2  # channels * temporal_patch * patch * patch
    inputs = {}
    for kind, key, grid in (("image", "pixel_values", _QWEN_IMAGE_GRID), ("video", "pixel_values_videos", _QWEN_VIDEO_GRID)):
        n = _count(items, kind)
        if n:
            t, h, w = grid
            inputs[key] = _rand(g, n * t * h * w, patch)
            inputs["image_grid_thw" if kind == "image" else "video_grid_thw"] = torch.tensor([grid] * n)

    def run(kind):
        t, h, w = _QWEN_IMAGE_GRID if kind == "image" else _QWEN_VIDEO_GRID
        if kind == "video" and frames_apart:  # Qwen3-VL: a timestamp (text) and markers around each frame
            return [tok for _ in range(t) for tok in [TEXT[0], VSTART] + [VIDEO] * (h * w // 4) + [VEND]]
        return [VSTART] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [VEND]
    return Media(inputs, _runs(items, run), items)


def _qwen3_media(model, g, items) -> Media:
    return _qwen_media(model, g, items, frames_apart=True)


def _qwen2_vl(attn):
    cfg = tf.Qwen2VLConfig(text_config=_qwen_text(), vision_config=_qwen_vision(embed_dim=32, mlp_ratio=2),
                           **_QWEN_IDS)
    return tf.Qwen2VLForConditionalGeneration(_attn(cfg, attn))


def _qwen2_5_vl(attn):
    cfg = tf.Qwen2_5_VLConfig(text_config=_qwen_text(),
                              vision_config=_qwen_vision(intermediate_size=64, out_hidden_size=32, window_size=8,
                                                         fullatt_block_indexes=[0]), **_QWEN_IDS)
    return tf.Qwen2_5_VLForConditionalGeneration(_attn(cfg, attn))


def _qwen3_vl(attn):
    text = _qwen_text(head_dim=8)
    text["rope_parameters"]["mrope_interleaved"] = True
    cfg = tf.Qwen3VLConfig(text_config=text, vision_config=_qwen_vision(
        depth=2, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **_QWEN_IDS)
    return tf.Qwen3VLForConditionalGeneration(_attn(cfg, attn))


def _clip(**kw):
    return dict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     image_size=16, patch_size=8), **kw)


def _llava_next(attn):
    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**_clip(projection_dim=32)),
                             text_config=tf.LlamaConfig(**TEXT_KW), image_token_index=IMAGE,
                             image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], vision_feature_layer=-1)
    return tf.LlavaNextForConditionalGeneration(_attn(cfg, attn))


def _anyres_media(model, g, items, sizes=((16, 32), (32, 16))) -> Media:
    """LLaVA-Next / OneVision anyres: a base crop plus the crops of the best grid; the token count
    depends on each image's size (computed by the model's own feature code)."""
    n = _count(items, "image")
    inputs = {}
    if n:
        image_sizes = torch.tensor([sizes[i % len(sizes)] for i in range(n)])
        inputs["pixel_values"] = _rand(g, n, 3, 3, 16, 16)  # (images, base + 2 crops, C, H, W)
        inputs["image_sizes"] = image_sizes
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=image_sizes).pooler_output
        counts = iter([f.shape[0] for f in feats])
    frames = _count(items, "video")
    if frames:
        inputs["pixel_values_videos"] = _rand(g, frames, 2, 3, 16, 16)  # (videos, frames, C, H, W)
        with torch.no_grad():
            vfeats = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
        vcount = vfeats[0].shape[0] if isinstance(vfeats, (list, tuple)) else vfeats.shape[0] * vfeats.shape[1] // frames
    video_id = getattr(model.config, "video_token_index", VIDEO)
    runs = [[[IMAGE] * next(counts) if k == "image" else [video_id] * vcount for k in row] for row in items]
    return Media(inputs, runs, items)


def _llava_onevision(attn):
    cfg = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**_clip()), text_config=tf.Qwen2Config(**TEXT_KW),
        image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_aspect_ratio="anyres_max_9")
    return tf.LlavaOnevisionForConditionalGeneration(_attn(cfg, attn))


def _llava_next_video(attn):
    cfg = tf.LlavaNextVideoConfig(vision_config=tf.CLIPVisionConfig(**_clip(projection_dim=32)),
                                  text_config=tf.LlamaConfig(**TEXT_KW), image_token_index=IMAGE,
                                  video_token_index=VIDEO, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
                                  vision_feature_layer=-1, spatial_pool_stride=1)
    return tf.LlavaNextVideoForConditionalGeneration(_attn(cfg, attn))


def _mistral3(attn):
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    head_dim=8, image_size=32, patch_size=8)
    cfg = tf.Mistral3Config(vision_config=vision, text_config=tf.MistralConfig(**TEXT_KW, head_dim=8),
                            image_token_index=IMAGE, spatial_merge_size=2)
    return tf.Mistral3ForConditionalGeneration(_attn(cfg, attn))


def _mistral3_media(model, g, items) -> Media:
    n = _count(items, "image")  # 16x16 pixels, 8x8 patches, 2x2 merge: one token
    inputs = {"pixel_values": _rand(g, n, 3, 16, 32), "image_sizes": torch.tensor([[16, 32]] * n)}
    return Media(inputs, _runs(items, lambda k: [IMAGE] * 2 + [EOI]), items)  # 1 x 2 tokens, [IMG_END]


def _internvl(attn):
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=[16, 16], patch_size=[4, 4])
    cfg = tf.InternVLConfig(vision_config=vision, text_config=tf.Qwen2Config(**TEXT_KW), image_token_id=IMAGE,
                            downsample_ratio=0.5, vision_feature_layer=-1)
    return tf.InternVLForConditionalGeneration(_attn(cfg, attn))


def _internvl_media(model, g, items) -> Media:
    n = _count(items, "image")  # 4x4 patches, pixel shuffle 0.5: 4 tokens per tile
    return Media({"pixel_values": _rand(g, n, 3, 16, 16)}, _runs(items, lambda k: [BOI] + [IMAGE] * 4 + [EOI]), items)


def _gemma3(attn):
    text = tf.Gemma3TextConfig(**{**TEXT_KW, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 512,
                                  "layer_types": ["sliding_attention", "full_attention"]})
    vision = tf.SiglipVisionConfig(**_clip(patch_size=4))
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=BOI,
                          eoi_token_index=EOI, image_token_index=IMAGE)
    return tf.Gemma3ForConditionalGeneration(_attn(cfg, attn))


def _gemma3_media(model, g, items) -> Media:
    n = _count(items, "image")
    return Media({"pixel_values": _rand(g, n, 3, 16, 16)}, _runs(items, lambda k: [BOI] + [IMAGE] * 4 + [EOI]), items)


def _idefics(cfg_cls, model_cls, vision_cls):
    def build(attn):
        vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=16, patch_size=4)
        cfg = cfg_cls(vision_config=vision, text_config=tf.LlamaConfig(**TEXT_KW), image_token_id=IMAGE,
                      scale_factor=2, pad_token_id=PAD)
        return model_cls(_attn(cfg, attn))
    return build


def _idefics_media(model, g, items) -> Media:
    most = max(len(row) for row in items)
    pv = torch.zeros(len(items), most, 3, 16, 16)  # (B, images, C, H, W); all-zero images are padding
    for b, row in enumerate(items):
        for i in range(len(row)):
            pv[b, i] = _rand(g, 3, 16, 16)
    return Media({"pixel_values": pv}, _runs(items, lambda k: [BOI] + [IMAGE] * 4 + [EOI]), items)


def _paligemma(attn):
    vision = tf.SiglipVisionConfig(**_clip(patch_size=4, projection_dim=32))
    text = tf.GemmaConfig(**{**TEXT_KW, "head_dim": 8})
    cfg = tf.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, projection_dim=32,
                             hidden_size=32, vocab_size=VOCAB)
    return tf.PaliGemmaForConditionalGeneration(_attn(cfg, attn))


def _paligemma_media(model, g, items) -> Media:
    n = _count(items, "image")  # 16 tokens per image (4x4 patches, no pooling)
    return Media({"pixel_values": _rand(g, n, 3, 16, 16)}, _runs(items, lambda k: [IMAGE] * 16), items)


def _mllama(attn):
    vision = tf.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                                   attention_heads=4, image_size=16, patch_size=8, max_num_tiles=1,
                                   vision_output_dim=64, intermediate_layers_indices=[0],
                                   supported_aspect_ratios=[[1, 1]])
    text = tf.MllamaTextConfig(**{**TEXT_KW, "cross_attention_layers": [1]})
    cfg = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    model = tf.MllamaForConditionalGeneration(_attn(cfg, attn))
    with torch.no_grad():  # the cross-attention gates start at 0 (tanh(0) = 0: the image is not read)
        for name, p in model.named_parameters():
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                p.fill_(0.5)
    return model


def _mllama_media(model, g, items) -> Media:
    most = max(len(row) for row in items)
    b = len(items)
    inputs = {"pixel_values": _rand(g, b, most, 1, 3, 16, 16),  # (B, images, tiles, C, H, W)
              "aspect_ratio_ids": torch.ones(b, most, dtype=torch.long),
              "aspect_ratio_mask": torch.ones(b, most, 1, dtype=torch.long)}
    return Media(inputs, _runs(items, lambda k: [IMAGE]), items)


MM_FAMILIES = [
    MMFamily("qwen2_vl", _qwen2_vl, _qwen_media, kinds=("image", "images", "video"), type_ids="mm_token_type_ids",
             note="M-RoPE (3, B, T) ids computed by the model; vision tower not capturable, runs eagerly"),
    MMFamily("qwen2_5_vl", _qwen2_5_vl, _qwen_media, kinds=("image", "images", "video"), type_ids="mm_token_type_ids",
             slow=True, note="window attention in the vision tower; M-RoPE"),
    MMFamily("qwen3_vl", _qwen3_vl, _qwen3_media, kinds=("image", "images", "video"), type_ids="mm_token_type_ids",
             refusal="indexing with a token-indexed tensor",
             note="deepstack adds visual features into the residual stream at data-dependent positions "
                  "(`hidden_states[visual_pos_masks, :] += ...` after early layers)"),
    MMFamily("llava_next", _llava_next, _anyres_media, note="anyres: a base crop and a data-dependent grid of crops"),
    MMFamily("llava_onevision", _llava_onevision, _anyres_media, kinds=("image", "images", "video"), slow=True),
    MMFamily("llava_next_video", _llava_next_video, _anyres_media, kinds=("image", "video"), slow=True),
    MMFamily("mistral3", _mistral3, _mistral3_media, slow=True),
    MMFamily("internvl", _internvl, _internvl_media, note="one tile per image (pixel shuffle)"),
    MMFamily("gemma3", _gemma3, _gemma3_media, type_ids="token_type_ids",
             note="bidirectional attention within each image (token_type_ids)"),
    MMFamily("idefics3", _idefics(tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3VisionConfig),
             _idefics_media, slow=True),
    MMFamily("smolvlm", _idefics(tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMVisionConfig),
             _idefics_media),
    MMFamily("paligemma", _paligemma, _paligemma_media, kinds=("image",), type_ids="prefix",
             note="prefix-LM mask (token_type_ids); one image per sample"),
    MMFamily("mllama", _mllama, _mllama_media, kinds=("image",), slow=True,
             note="cross-attention to image tokens runs on kept queries; one single-tile image per sample"),
]
BY_NAME = {f.name: f for f in MM_FAMILIES}


# --- batches ----------------------------------------------------------------------------------

def make_mm_batch(fam: MMFamily, model: torch.nn.Module, items: list[list[str]], *, text: int = 4,
                  pad: str = "left", seed: int = 0) -> dict:
    """A padded batch: per sample, `text` text tokens before, between and after its media runs.

    Samples get different amounts of text (sample b has b extra tokens), so with padding they
    differ in length; labels ignore padding and every visual / marker token.
    """
    g = torch.Generator().manual_seed(seed)
    media = fam.media(model, g, items)
    rows, kinds = [], []
    for b, runs in enumerate(media.runs):
        row, kind = [], []
        extra = b
        for i, run in enumerate(runs):
            n = text + (extra if i == 0 else 0)
            row += torch.randint(*TEXT, (n,), generator=g).tolist()
            kind += ["text"] * n
            row += run
            kind += [media.kinds[b][i] if t in (IMAGE, VIDEO) or t == getattr(model.config, "video_token_index", -1)
                     else "marker" for t in run]
        row += torch.randint(*TEXT, (text,), generator=g).tolist()
        kind += ["text"] * text
        rows.append(row)
        kinds.append(kind)
    width = max(len(r) for r in rows)
    bsz = len(rows)
    ids = torch.full((bsz, width), PAD, dtype=torch.long)
    am = torch.zeros(bsz, width, dtype=torch.long)
    kind_of = [["pad"] * width for _ in range(bsz)]
    for b, (row, kind) in enumerate(zip(rows, kinds)):
        start = width - len(row) if pad == "left" else 0
        ids[b, start:start + len(row)] = torch.tensor(row)
        am[b, start:start + len(row)] = 1
        kind_of[b][start:start + len(row)] = kind
    visual = torch.tensor([[k in ("image", "video") for k in row] for row in kind_of])
    marker = torch.tensor([[k == "marker" for k in row] for row in kind_of])
    batch = {"input_ids": ids, "attention_mask": am, **media.inputs}
    if fam.type_ids == "mm_token_type_ids":  # Qwen-VL: 0 text, 1 image, 2 video
        batch["mm_token_type_ids"] = torch.tensor([[{"image": 1, "video": 2}.get(k, 0) for k in row] for row in kind_of])
    elif fam.type_ids == "token_type_ids":  # Gemma3: 1 at image tokens
        batch["token_type_ids"] = visual.long()
    elif fam.type_ids == "prefix":  # PaliGemma: 0 for the prefix (image + first text), 1 for the suffix
        tt = torch.ones_like(ids)
        for b in range(bsz):
            real = am[b].nonzero().flatten()
            tt[b, real[: len(real) - text]] = 0
        batch["token_type_ids"] = tt
    if fam.name == "mllama":  # which image each text token attends to: every image of its sample
        most = max(len(r) for r in items)
        cam = torch.zeros(bsz, width, most, 1, dtype=torch.long)
        for b, row in enumerate(items):
            cam[b, :, : len(row)] = 1
        batch["cross_attention_mask"] = cam * am[:, :, None, None]
    labels = ids.masked_fill((am == 0) | visual | marker, -100)
    batch["labels"] = labels
    batch["visual_mask"] = visual  # not a model input: popped by the tests, read by the runtime
    batch["marker_mask"] = marker
    return batch


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("visual_mask", "marker_mask")}


def keep_visual(batch: dict, rho: float, seed: int = 0) -> torch.Tensor:
    """Keep every visual and marker token (the runtime protects them) and a random rho of the text."""
    g = torch.Generator().manual_seed(seed)
    am = batch["attention_mask"].bool()
    keep = ((torch.rand(am.shape, generator=g) < rho) | batch["visual_mask"] | batch["marker_mask"]) & am
    first = am.float().argmax(1)
    keep[torch.arange(am.size(0)), first] = True
    return keep


# --- text families of issue 7 (tests/models.py's TinyModel, so tests/helpers.make_batch works) ----

def _text_families():
    from tests.models import TinyModel, _causal

    return [
        # OLMo clips q/k/v in place (`query_states.clamp_(...)`) inside the attention branch.
        TinyModel("olmo_clip_qkv", _causal(tf.OlmoConfig, tf.OlmoForCausalLM, num_key_value_heads=2, clip_qkv=0.5,
                                           eos_token_id=2, pad_token_id=0)),
        # Llama4's RoPE is complex-valued: torch.polar for the table, view_as_complex on q and k.
        TinyModel("llama4", _causal(tf.Llama4TextConfig, tf.Llama4ForCausalLM, num_key_value_heads=2, head_dim=8,
                                    intermediate_size_mlp=64, moe_layers=[], attention_chunk_size=1024,
                                    eos_token_id=2, pad_token_id=0)),
    ]


TEXT_FAMILIES = _text_families()
TEXT_BY_NAME = {m.name: m for m in TEXT_FAMILIES}
