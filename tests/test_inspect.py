"""`regate-fx inspect` (regate_fx/inspect.py): the CLI on a family name, a config.json and a directory,
its --json schema, a broken config, and its verdict against the oracle on a sample of families.

The agreement check builds the same tiny model independently (the inspector's own config shrinking,
then tests/helpers' batch, keep mask and `check_against_oracle`, gradients included): an
"exact-sparse" verdict must pass it, a "refused" one must be a RewriteError from `sparsify`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import regate_fx
from regate_fx import inspect as rinspect
from regate_fx.inspect import shrink
from tests.helpers import check_against_oracle, make_batch, random_keep

SCHEMA = {"target", "family", "config_class", "model_class", "auto_class", "verdict", "reasons", "error",
          "branches", "kept", "dense", "kept_flop_fraction", "kept_flop_fraction_model", "branches_rewritten",
          "tail_on_kept", "oracle_max_diff", "oracle_loss_diff", "notes", "seconds"}


def _cli_json(capsys, *argv: str) -> tuple[int, object]:
    code = rinspect.main(["inspect", *argv, "--json", "--seq", "8"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def llama_json():
    """`regate-fx inspect llama --json`, run once for the module."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = rinspect.main(["inspect", "llama", "--json", "--seq", "8"])
    return code, json.loads(buf.getvalue())


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_cli_family_name_json_schema(llama_json):
    code, out = llama_json
    assert code == 0
    assert set(out) == SCHEMA
    assert out["family"] == "llama" and out["model_class"] == "LlamaForCausalLM"
    assert out["verdict"] == "exact-sparse" and out["reasons"] == [] and out["error"] == ""
    assert out["branches_rewritten"] == len(out["branches"]) == 4  # shrunk to 2 layers: attention + MLP each
    assert {b["kind"] for b in out["branches"]} == {"attention", "mlp"}
    assert all(b["rewritten"] and b["flops"] > 0 for b in out["branches"])
    assert out["kept_flop_fraction"] == pytest.approx(1.0)
    assert 0 < out["kept_flop_fraction_model"] <= 1.0
    assert out["oracle_max_diff"] < 1e-4 and out["oracle_loss_diff"] < 1e-4
    assert out["tail_on_kept"] is True and "final norm, LM head and loss" in out["kept"]


def test_cli_config_dir_and_file(tmp_path, capsys):
    _tiny_llama_config().save_pretrained(tmp_path)
    code, out = _cli_json(capsys, str(tmp_path), str(tmp_path / "config.json"))
    assert code == 0
    assert [r["verdict"] for r in out] == ["exact-sparse", "exact-sparse"]
    assert [r["target"] for r in out] == [str(tmp_path), str(tmp_path / "config.json")]
    assert all(r["family"] == "llama" and r["config_class"] == "LlamaConfig" for r in out)


@pytest.fixture(scope="module")
def refused_result():
    # refused: Bloom's ALiBi attention is (batch*heads, queries, keys) bmm, its GELU a custom autograd function
    return rinspect.inspect_model("bloom", seq=8)


def test_rich_output(refused_result, capsys):
    """The default output is a rich rendering with the verdict; a refusal names its reasons."""
    import io

    from rich.console import Console

    console = Console(record=True, width=160, file=io.StringIO())
    console.print(refused_result)
    text = console.export_text()
    assert refused_result.exit_code == 1
    assert "verdict: refused" in text and "ATTENTION_FORM" in text and "transformer.h.0.self_attention" in text
    # the CLI's rich path (no --json), on a target that fails fast: exit code 2
    assert rinspect.main(["inspect", "no_such_family_xyz"]) == 2
    assert "verdict: error" in capsys.readouterr().out


def test_broken_config_is_an_error_not_a_crash(tmp_path, capsys):
    cfg = _tiny_llama_config()
    cfg.hidden_act = "no_such_activation"
    cfg.save_pretrained(tmp_path)
    code, out = _cli_json(capsys, str(tmp_path))
    assert code == 2
    assert out["verdict"] == "error" and "no_such_activation" in out["error"]
    # an unknown family too, next to a good one: one bad target does not stop the others
    res = rinspect.inspect_model("no_such_family_xyz")
    assert res.verdict == "error" and "no_such_family_xyz" in res.error and res.exit_code == 2


def test_shrink_config_is_generic():
    from transformers import AutoConfig

    for name in ("llama", "qwen2_moe", "llava"):
        cfg = rinspect.shrink_config(AutoConfig.for_model(name))
        subs = [cfg] + [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
        for c in subs:
            d = vars(c)
            if "hidden_size" in d and "num_attention_heads" in d:
                assert d["hidden_size"] <= shrink.HIDDEN and d["hidden_size"] % d["num_attention_heads"] == 0
            if "num_hidden_layers" in d:
                assert d["num_hidden_layers"] <= shrink.LAYERS
            if "vocab_size" in d:
                assert d["vocab_size"] <= shrink.VOCAB


def test_shrink_keeps_every_kind_of_layer_and_consistent_ssm_sizes():
    """Hybrids: the tiny model keeps one layer of each kind (Qwen3-Next's first linear-attention
    and first full-attention layers, not its first two linear ones, which transformers cannot build
    a mask for), layer-index lists follow (Zamba2), and a Mamba-2 mixer's heads x head dim equals
    expand x hidden (Bamba)."""
    from transformers import AutoConfig

    full = AutoConfig.for_model("qwen3_next").layer_types
    tiny = rinspect.shrink_config(AutoConfig.for_model("qwen3_next"))
    assert tiny.layer_types == [t for i, t in enumerate(full) if t not in full[:i]]  # first of each kind, in order
    assert tiny.num_hidden_layers == len(tiny.layer_types) == 2
    z = rinspect.shrink_config(AutoConfig.for_model("zamba2"))
    assert z.num_hidden_layers == len(z.layers_block_type) and set(z.hybrid_layer_ids) <= set(range(z.num_hidden_layers))
    assert [z.layers_block_type[i] for i in z.hybrid_layer_ids] == ["hybrid"] * len(z.hybrid_layer_ids)
    b = rinspect.shrink_config(AutoConfig.for_model("bamba"))
    assert b.mamba_n_heads * b.mamba_d_head == b.mamba_expand * b.hidden_size
    assert b.mamba_n_heads % b.mamba_n_groups == 0
    llama = rinspect.shrink_config(AutoConfig.for_model("llama"))  # one kind: the first layers, as before
    assert llama.num_hidden_layers == shrink.LAYERS


# --- the verdict agrees with running the model against the oracle -------------------------------------

def _build_independently(family: str, keep_head_dim: bool = False):
    from transformers import AutoConfig

    cfg = rinspect.shrink_config(AutoConfig.for_model(family), keep_head_dim=keep_head_dim)
    _, cls = shrink.model_class(cfg)
    torch.manual_seed(1)
    return cls._from_config(cfg, dtype=torch.float32).float().eval()


def _agrees(verdict: str, family: str) -> None:
    model = _build_independently(family)
    tiny = SimpleNamespace(multimodal=False)
    batch = make_batch(tiny, 2, 12, pad="right", lengths=[12, 9], seed=3)
    keep = random_keep(batch, 0.5, seed=3)
    # in place: the same model is the sparse one (with keep_mask) and the oracle's dense one (without)
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(progress=False), backend="eager")
    if verdict == "exact-sparse":
        check_against_oracle(smodel, model, batch, keep)
    else:
        assert verdict == "refused", verdict
        with pytest.raises((regate_fx.RewriteError, regate_fx.KeepMaskError)):  # no stream at all: KeepMaskError
            smodel(**batch, keep_mask=keep)


def test_verdict_agrees_with_oracle_llama(llama_json):
    _agrees(llama_json[1]["verdict"], "llama")


def test_verdict_agrees_with_oracle_bloom(refused_result):
    assert refused_result.verdict == "refused"
    assert refused_result.reasons and all(r.reason in regate_fx.Reason.__members__ for r in refused_result.reasons)
    _agrees(refused_result.verdict, "bloom")


@pytest.mark.slow  # CI time: tests/passes/test_llama4.py runs it exact-sparse in the default run
def test_verdict_agrees_with_oracle_llama4_text():
    """Llama 4 (expert-major tiled MoE, passes/tiling.py; chunked attention) runs exact-sparse."""
    res = rinspect.inspect_model("llama4_text", seq=8)
    assert res.verdict == "exact-sparse", (res.error, res.reasons)
    _agrees(res.verdict, "llama4_text")


@pytest.mark.slow  # CI time: tests/passes/test_sinks.py runs it exact-sparse in the default run
def test_verdict_agrees_with_oracle_gpt_oss():
    """gpt-oss (attention sinks joined to the scores, passes/sinks.py) runs exact-sparse."""
    res = rinspect.inspect_model("gpt_oss", seq=8)
    assert res.verdict == "exact-sparse", (res.error, res.reasons)
    _agrees(res.verdict, "gpt_oss")


def test_verdict_agrees_with_oracle_mixtral():
    """Mixtral (transformers' default sorted expert dispatch) runs exact-sparse (passes/dispatch.py)."""
    res = rinspect.inspect_model("mixtral", seq=8)
    assert res.verdict == "exact-sparse", (res.error, res.reasons)
    _agrees(res.verdict, "mixtral")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "jamba", "gpt2", "mamba", "llava"])
def test_verdict_agrees_with_oracle(family):
    res = rinspect.inspect_model(family, seq=8)
    assert res.verdict in ("exact-sparse", "refused"), res.error
    if res.verdict == "refused":
        assert res.reasons and all(r.reason in regate_fx.Reason.__members__ for r in res.reasons)
        assert res.kept_flop_fraction is None
    _agrees(res.verdict, family)


def test_eager_and_compiled_dense_disagree_is_diagnosed():
    """PaliGemma (use_bidirectional_attention=True) on an unpadded text-only batch: transformers'
    eager forward skips the all-ones causal mask and the attention (is_causal=False) then attends
    bidirectionally, while the compiled forward is causal. The sparse step cannot equal the eager
    oracle; inspect says why instead of blaming regate_fx (with token_type_ids the model is exact:
    tests/test_mm_matrix.py)."""
    res = rinspect.inspect_model("paligemma", seq=8)
    assert res.verdict == "error"
    assert "eager and torch.compile forwards already differ" in res.error, res.error
    assert "a bug in regate_fx" not in res.error
