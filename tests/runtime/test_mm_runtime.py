"""The runtime knows the visual tokens of every family in the matrix (issue 7).

Nobody writes an id down: `ReGateConfig.for_model` reads the image / video placeholders and the
markers around them from the model's config, `ReGate` keeps them at every step, and
`text_only_teacher(model)` replaces images and videos alike by the pad token.
"""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx import ReGate, ReGateConfig, text_only_teacher
from regate_fx.runtime.selection import supervised_mask
from tests.helpers import check_against_oracle
from tests.mm_models import BOI, EOI, MM_FAMILIES, PAD, VEND, VSTART, keep_visual, make_mm_batch, model_inputs
from tests.mm_models import BY_NAME as MM

# Markers a config names (the others' markers live in their tokenizers: pass special_token_ids).
CONFIG_MARKERS = {"qwen2_vl": {VSTART, VEND}, "qwen2_5_vl": {VSTART, VEND}, "qwen3_vl": {VSTART, VEND},
                  "gemma3": {BOI, EOI}}


def _items(fam) -> list[list[str]]:
    if "video" in fam.kinds:
        return [["video"], ["image", "video"]] if "images" in fam.kinds else [["video"], ["image"]]
    return [["image", "image"], ["image"]] if "images" in fam.kinds else [["image"], ["image"]]


@pytest.fixture(scope="module", params=MM_FAMILIES, ids=lambda f: f.name)
def family(request):
    fam = request.param
    model = fam("sdpa")
    return fam, model, make_mm_batch(fam, model, _items(fam), pad="left", seed=1)


def test_config_names_every_placeholder_and_marker(family):
    fam, model, batch = family
    cfg = ReGateConfig.for_model(model, rho_min=0.3)
    ids, visual = batch["input_ids"], batch["visual_mask"]
    assert set(ids[visual].tolist()) <= set(cfg.visual_token_ids)  # images and videos
    assert set(cfg.special_token_ids) == CONFIG_MARKERS.get(fam.name, set())
    assert cfg.rho_min == 0.3
    assert set(ReGateConfig.for_model(model, special_token_ids=(7,)).special_token_ids) == \
        CONFIG_MARKERS.get(fam.name, set()) | {7}


def test_regate_keeps_every_visual_token(family):
    fam, model, batch = family
    rg = ReGate(ReGateConfig.for_model(model, lam=0.0, warmup_steps=0, schedule="constant", rho_min=0.2),
                num_samples=2)
    keep = rg.keep_mask({**batch, "sample_id": torch.arange(2)}, 0)
    real = batch["attention_mask"].bool()
    assert bool((keep[batch["visual_mask"]]).all())
    markers = torch.isin(batch["input_ids"], torch.tensor(sorted(CONFIG_MARKERS.get(fam.name, {-1}))))
    assert bool(keep[markers & real].all())
    assert int((keep & ~batch["visual_mask"] & ~markers).sum()) < int((real & ~batch["visual_mask"] & ~markers).sum())


def test_text_only_teacher_of_every_family(family):
    """The teacher is the model's own language model and head on the text with every image and
    video placeholder replaced by the pad token (same length, same positions)."""
    fam, model, batch = family
    teacher = text_only_teacher(model)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    x = teacher.text_only_ids(ids, am.bool())
    assert bool((x[batch["visual_mask"]] == PAD).all()) and torch.equal(x[~batch["visual_mask"]], ids[~batch["visual_mask"]])
    r = teacher.reference_losses(ids, am, labels)
    sup = supervised_mask(labels, am.bool())
    assert bool(torch.isfinite(r[sup]).all()) and bool(torch.isnan(r[~sup]).all())
    # the same losses from the decoder and head alone: no pixel input, no vision tower involved
    r_dec = text_only_teacher(model, mode="decoder").reference_losses(ids, am, labels)
    torch.testing.assert_close(r[sup], r_dec[sup], atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3"])
def test_runtime_keep_mask_drives_an_exact_sparse_step(name):
    """End to end: the runtime's keep mask (visual tokens and markers protected from the config
    alone) drives a sparse step that equals the oracle."""
    fam = MM[name]
    model = fam("sdpa")
    batch = make_mm_batch(fam, model, _items(fam), pad="left", seed=2)
    rg = ReGate(ReGateConfig.for_model(model, lam=0.0, warmup_steps=0, schedule="constant", rho_min=0.3),
                num_samples=2)
    keep = rg.keep_mask({**batch, "sample_id": torch.arange(2)}, 0)
    assert not torch.equal(keep, batch["attention_mask"].bool())  # sparse
    smodel = regate_fx.sparsify(model, backend="eager")
    check_against_oracle(smodel, model, model_inputs(batch), keep, grad_scale=2e-6)


def test_mm_token_type_ids_mark_visual_positions():
    """A batch's Qwen-VL modality ids protect their positions even without the config's ids."""
    fam = MM["qwen2_vl"]
    model = fam("sdpa")
    batch = make_mm_batch(fam, model, [["image"], ["video"]], seed=3)
    rg = ReGate(ReGateConfig(lam=0.0, warmup_steps=0, schedule="constant", rho_min=0.2), num_samples=2)
    keep = rg.keep_mask({**batch, "sample_id": torch.arange(2)}, 0)
    assert bool(keep[batch["mm_token_type_ids"] != 0].all())
    # (unused import guard for keep_visual: the matrix's own helper keeps the same positions)
    assert bool((keep_visual(batch, 0.0) >= batch["visual_mask"]).all())
