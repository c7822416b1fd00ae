"""Per-layer FSDP2 over a sparsified model (SparsifyConfig(execution="gathered")), 2 gloo ranks.

``fully_shard`` on every decoder layer and on the root, in both orders (shard then sparsify;
sparsify then shard), with and without activation checkpointing, fp32 and bf16
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``. Each rank has its own batch and keep
mask. Checked against one process computing every rank's oracle (the dense model on each kept
subsequence) and averaging, as FSDP does:

- loss per rank and every full gradient: fp32 within 1e-5; bf16 within 1.5x the dense oracle's
  own bf16-vs-fp32 gap (relative norm over all gradients);
- the ReGate state (difficulty EMA, token counts) is identical on both ranks after ``update``;
- per-rank bytes of parameters and gradients held during the step (storages of every FSDP
  parameter: sharded, unsharded when gathered, unsharded and sharded gradients), sampled at every
  module's forward and around every decoder layer's backward: the peak equals the same sharding
  run dense (no keep_mask), and is at most 1/N of all parameters and gradients plus the root's
  group plus two layers (FSDP2 prefetches the next layer's all-gather);
- the collectives (all-gathers, reduce-scatters, all-reduces: number, and bytes each) are the
  same list as the dense step's.

The default run covers three configurations on the tiny Llama in one spawn; ``-m slow`` runs
all eight on the tiny Llama and on a 21.6M-parameter Llama.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import transformers as tf

import regate_fx
from tests.helpers import make_batch, random_keep
from tests.mm_models import BY_NAME as MM
from tests.mm_models import keep_visual, make_mm_batch, model_inputs
from tests.models import BY_NAME, COMMON, TinyModel, _causal
from tests.runtime.runtime_helpers import exit_rank, file_store, spawn_ranks

WORLD = 2
TINY = BY_NAME["llama"]
# 21.6M parameters: 4.2M in the (4096, 512) embedding and head, 2.9M per decoder layer
LLAMA_21M = TinyModel(
    "llama_21m",
    _causal(
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        **{
            **COMMON,
            "vocab_size": 4096,
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
        },
    ),
)
QWEN2_VL = MM["qwen2_vl"]  # its own vision tower (in the root's group), 3-D M-RoPE positions
MODELS = {"llama": TINY, "llama_21m": LLAMA_21M, "qwen2_vl": QWEN2_VL}
COLLECTIVES = (  # FSDP2 in torch 2.13 calls all_gather_single / reduce_scatter_single
    "all_gather_single",
    "reduce_scatter_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "_all_gather_base",
    "_reduce_scatter_base",
)


def _rank_inputs(tm, rank: int):
    if tm is QWEN2_VL:  # an image per sample; visual tokens kept, as the runtime protects them
        full = make_mm_batch(tm, tm("sdpa"), [["image"], ["image"]], pad="left", seed=rank)
        return model_inputs(full), keep_visual(full, 0.5, seed=10 + rank)
    batch = make_batch(tm, 2, 10 + 2 * rank, pad="left", seed=rank)  # ranks differ in T and K too
    return batch, random_keep(batch, 0.5, seed=10 + rank)


def _layers(model):
    """The decoder layers: `model.model.layers`, or the language model's in a multimodal model."""
    inner = model.model
    return inner.layers if hasattr(inner, "layers") else inner.language_model.layers


# --- instrumentation ----------------------------------------------------------------------------


class Collectives:
    """Wraps torch.distributed's collectives: (name, bytes) of each call while `on`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.on = False
        self._orig = {}
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._orig[name] = fn
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            if self.on:
                t = args[0] if args else next(iter(kwargs.values()), None)  # the output (first) tensor
                if isinstance(t, (list, tuple)) and t:
                    t = t[0]
                if not isinstance(t, torch.Tensor):
                    t = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else -1
                self.calls.append((name, nbytes))
            return fn(*args, **kwargs)

        return call


def _fsdp_params(model):
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None:
                out.extend(group.fsdp_params)
    return out


def _storage_bytes(ts) -> int:
    seen = {}
    for t in ts:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)  # a DTensor's shard
        s = t.untyped_storage()
        if s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class Bytes:
    """Per-rank bytes of parameters and gradients, sampled at module hooks: the peak of a step."""

    def __init__(self, model) -> None:
        self.model, self.peak, self.on = model, 0, False
        self.params = _fsdp_params(model)
        for m in model.modules():
            m.register_forward_pre_hook(self._sample)
            m.register_forward_hook(self._sample)
        for layer in _layers(model):
            layer.register_forward_hook(self._tensor_hooks)

    def now(self) -> int:
        ts = []
        for fp in self.params:
            ts.append(fp.sharded_param)
            ts.append(fp.sharded_param.grad)
            up = getattr(fp, "_unsharded_param", None)
            if up is not None:
                ts.append(up)
                ts.append(up.grad)
            ts.append(getattr(fp, "unsharded_accumulated_grad", None))
        return _storage_bytes(ts)

    def _sample(self, *_args) -> None:
        if self.on:
            self.peak = max(self.peak, self.now())

    def _tensor_hooks(self, _m, args, out) -> None:
        h = out[0] if isinstance(out, tuple) else out
        if self.on and isinstance(h, torch.Tensor) and h.requires_grad:
            h.register_hook(lambda g: self._sample())  # backward reaches this layer
        x = args[0] if args else None
        if self.on and isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(lambda g: self._sample())  # backward left this layer


# --- the ranks ----------------------------------------------------------------------------------


def _build(tm, order: str, ckpt: bool, bf16: bool, mesh, sparse: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = tm("sdpa").train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    # sparsified before sharding: "auto" (it sees the per-layer sharding at the call and picks "gathered")
    cfg = regate_fx.SparsifyConfig(execution="auto" if order == "sparsify_then_shard" else "gathered")

    def shard():
        for layer in _layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)

    if order == "sparsify_then_shard" and sparse:
        regate_fx.sparsify(model, cfg)
        shard()
    else:
        shard()
        if sparse:
            regate_fx.sparsify(model, cfg)
    return model


def _step(model, batch, keep, sparse: bool, colls: Collectives, nbytes: Bytes):
    inputs = {k: v for k, v in batch.items() if k != "sample_id"}
    colls.calls.clear()
    colls.on = nbytes.on = True
    if sparse:
        out = model(**inputs, keep_mask=keep)
    else:
        out = model(**inputs)
    out.loss.backward()
    colls.on = nbytes.on = False
    return out


def _worker(rank: int, init: str, out: str, model_name: str, configs: list) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        colls = Collectives()
        tm = MODELS[model_name]
        batch, keep = _rank_inputs(tm, rank)
        batch["sample_id"] = torch.tensor([2 * rank, 2 * rank + 1])
        results = {}
        for order, ckpt, bf16 in configs:
            name = f"{order}-ckpt{int(ckpt)}-{'bf16' if bf16 else 'fp32'}"
            res = {}
            for sparse in (True, False):  # ReGATE, then the same sharding dense
                model = _build(tm, order, ckpt, bf16, mesh, sparse)
                nbytes = Bytes(model)
                o = _step(model, batch, keep, sparse, colls, nbytes)
                res["sparse" if sparse else "dense"] = {
                    "loss": o.loss.detach().float(),
                    "peak": nbytes.peak,
                    "collectives": list(colls.calls),
                }
                if sparse:
                    res["grads"] = {n: p.grad.full_tensor().float() for n, p in model.named_parameters()}
                    res["sharded"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
                    rg = regate_fx.ReGate(regate_fx.ReGateConfig(lam=0.0), num_samples=2 * WORLD)
                    rg.update(batch, o.token_loss.detach(), keep)  # a collective: same state on every rank
                    res["regate"] = rg.state_dict()["store"]
                    total = sum(p.numel() * 4 for p in model.parameters())  # fp32 sharded params
                    res["total_param_bytes"] = total
                    layers = _layers(model)
                    res["layer_param_bytes"] = sum(p.numel() * 4 for p in layers[0].parameters())
                    res["root_param_bytes"] = total - len(layers) * res["layer_param_bytes"]
                del model
            results[name] = res
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


# --- the reference ------------------------------------------------------------------------------


def _reference(tm, dtype=torch.float32):
    """Every rank's oracle loss and the mean of the ranks' oracle gradients, in one process."""
    model = tm("sdpa").train().to(dtype)
    losses, grads = [], []
    for r in range(WORLD):
        model.zero_grad(set_to_none=True)
        batch, keep = _rank_inputs(tm, r)
        loss = regate_fx.oracle(model, batch, keep)[1]
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({n: p.grad.detach().float().clone() for n, p in model.named_parameters()})
    return losses, {n: sum(g[n] for g in grads) / WORLD for n in grads[0]}


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in b)
    den = sum(float(b[n].pow(2).sum()) for n in b)
    return (num / den) ** 0.5


def _check(tmp_path, model_name: str, configs: list, report: str | None = None):
    spawn_ranks(_worker, (file_store(tmp_path), str(tmp_path), model_name, configs), WORLD, timeout=1200)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    tm = MODELS[model_name]
    losses, want = _reference(tm)
    bf16_gap = None
    summary = {}
    for name in got[0]:
        bf16 = name.endswith("bf16")
        if bf16 and bf16_gap is None:
            losses16, want16 = _reference(tm, torch.bfloat16)
            bf16_gap = (_rel(want16, want), max(abs(float(a - b)) for a, b in zip(losses16, losses)))
        for r in range(WORLD):
            res = got[r][name]
            assert res["sharded"], name
            loss, grads = res["sparse"]["loss"], res["grads"]
            assert set(grads) == set(want)
            if bf16:
                assert abs(float(loss - losses[r])) <= 1.5 * bf16_gap[1] + 1e-3, (
                    name,
                    r,
                    float(loss),
                    float(losses[r]),
                )
                rel = _rel(grads, want)
                assert rel <= 1.5 * bf16_gap[0], (name, rel, bf16_gap)
            else:
                diff = abs(float(loss - losses[r]))
                assert diff <= 1e-5, (name, r, float(loss), float(losses[r]), diff)
                for n in want:
                    torch.testing.assert_close(grads[n], want[n], atol=1e-5, rtol=1e-4, msg=f"{name} rank {r} grad {n}")
            # the same collectives as the dense step: number, kind and bytes of each, in order
            assert res["sparse"]["collectives"] == res["dense"]["collectives"], (
                name,
                res["sparse"]["collectives"],
                res["dense"]["collectives"],
            )
            kinds = {c for c, _ in res["sparse"]["collectives"]}
            assert {"all_gather_single", "reduce_scatter_single"} <= kinds, (name, kinds)
            # the same peak of parameter + gradient bytes as the dense step, about 1/N + a layer
            peak, dense_peak = res["sparse"]["peak"], res["dense"]["peak"]
            assert peak == dense_peak, (name, peak, dense_peak)
            total, layer, root = res["total_param_bytes"], res["layer_param_bytes"], res["root_param_bytes"]
            scale = 0.5 if bf16 else 1.0  # unsharded bf16 copies
            bound = 2 * total / WORLD + scale * 2 * (root + 2 * layer)  # shards (params + grads) + gathered
            assert peak <= bound * 1.02, (name, peak, bound)
        assert torch.equal(
            got[0][name]["regate"]["ema"] if "ema" in got[0][name]["regate"] else torch.tensor(0),
            got[1][name]["regate"]["ema"] if "ema" in got[1][name]["regate"] else torch.tensor(0),
        )
        assert repr(got[0][name]["regate"]) == repr(got[1][name]["regate"]), name
        res = got[0][name]
        summary[name] = {
            "peak_bytes_sparse": res["sparse"]["peak"],
            "peak_bytes_dense": res["dense"]["peak"],
            "unsharded_params_plus_grads": 2 * res["total_param_bytes"],
            "collectives": {
                k: [
                    sum(1 for c, _ in res["sparse"]["collectives"] if c == k),
                    sum(b for c, b in res["sparse"]["collectives"] if c == k),
                ]
                for k in {c for c, _ in res["sparse"]["collectives"]}
            },
        }
    if report:
        with open(report, "w") as f:
            json.dump({"model": model_name, "world": WORLD, "configs": summary}, f, indent=1)
    return summary


def test_per_layer_fsdp2_equals_one_process(tmp_path):
    """Three configurations in one spawn: both orders, checkpointing, bf16 mixed precision."""
    configs = [
        ("shard_then_sparsify", False, False),
        ("sparsify_then_shard", True, False),
        ("shard_then_sparsify", True, True),
    ]
    _check(tmp_path, "llama", configs, os.environ.get("REGATE_FSDP_REPORT"))


ALL = [(o, c, b) for o in ("shard_then_sparsify", "sparsify_then_shard") for c in (False, True) for b in (False, True)]


@pytest.mark.slow
def test_per_layer_fsdp2_qwen2_vl(tmp_path):
    """A tiny Qwen2-VL: vision tower in the root's group, 3-D M-RoPE positions gathered; both orders,
    checkpointing, bf16 mixed precision."""
    configs = [("shard_then_sparsify", True, False), ("sparsify_then_shard", False, True)]
    _check(tmp_path, "qwen2_vl", configs, os.environ.get("REGATE_FSDP_REPORT_VL"))


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["llama", "llama_21m"])
def test_per_layer_fsdp2_every_configuration(tmp_path, model_name):
    _check(tmp_path, model_name, ALL, os.environ.get("REGATE_FSDP_REPORT_SLOW"))
