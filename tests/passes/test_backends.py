"""The rewritten graph through the real compilers: aot_autograd (aot_eager) and inductor.

The eager backend runs the rewritten FX graph as Python; these check that what the pass emits is
also traceable by aot_autograd (the backward is derived from the rewritten graph) and compiles
with inductor, with varying kept lengths and no recompilation.
"""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

import regate_fx
from regate_fx.passes.kernels import kept_rows, kept_rows_packed
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME


def _run_two_masks(name: str, attn: str, backend: str, config: regate_fx.SparsifyConfig | None = None) -> None:
    """Three calls of different kept length K, sequence length and padding side, each against the
    oracle. With ``dynamic=None`` (default) the first graph is compiled for its sizes and the second
    call recompiles once, symbolic; with ``dynamic=True`` nothing recompiles. The third call never
    does. (The batch size stays: LLaVA's own forward specialises on the number of images,
    `list(image_features)`.)"""
    tm = BY_NAME[name]
    model = tm(attn)
    smodel = regate_fx.sparsify(model, config, backend=backend)
    dynamic = (config or regate_fx.SparsifyConfig()).dynamic
    batch = make_batch(tm, 3, 16, pad="left", seed=2)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=1))
    first = smodel.regate_report.graphs[0]  # the step with labels (a call without them, for the logits, is the second)
    assert bool(first.static_sizes) == (dynamic is None), first.static_sizes
    if dynamic is None:  # B, T and K of this call: 3, 16 and the largest kept count
        assert set(first.static_sizes.values()) >= {3, 16}, first.static_sizes
    for expect_new, (t, pad, rho, seed) in zip((dynamic is None, False), ((13, "right", 0.3, 3), (14, "left", 0.7, 5))):
        graphs = counters["stats"]["unique_graphs"]
        batch = make_batch(tm, 3, t, pad=pad, seed=seed)
        check_against_oracle(smodel, model, batch, random_keep(batch, rho, seed=seed))
        assert counters["stats"]["unique_graphs"] == graphs + expect_new
        assert not smodel.regate_report.graphs[-1].static_sizes  # symbolic from the second graph on
    assert smodel.regate_report.refused == []


@pytest.mark.parametrize("name,attn,dynamic", [("llama", "sdpa", None),  # dynamic=True slow: CI time
                                               pytest.param("llama", "sdpa", True, marks=pytest.mark.slow),
                                               pytest.param("phi", "eager", None, marks=pytest.mark.slow),
                                               ("llava", "sdpa", None)])
def test_aot_eager_matches_oracle(name, attn, dynamic):
    _run_two_masks(name, attn, "aot_eager", regate_fx.SparsifyConfig(dynamic=dynamic))


@pytest.mark.inductor
@pytest.mark.parametrize("name,attn", [("llama", "sdpa"),  # one representative inductor run in CI
                                       pytest.param("gpt_neox", "eager", marks=pytest.mark.slow)])
def test_inductor_matches_oracle(name, attn):
    # return_logits=True: one inductor compile per graph (logits with the loss) instead of two
    # (loss-only step, then a call without labels for the logits)
    _run_two_masks(name, attn, "inductor", regate_fx.SparsifyConfig(return_logits=True))


# --- AOTAutograd's cache ------------------------------------------------------------------------

def _cacheability_errors(name: str, attn: str, checkpointing: bool = False, layout: str = "padded",
                         dynamic: bool | None = None) -> list[str]:
    """Run one sparse step with a callable inner backend that applies AOTAutograd's own cacheability
    check to the graph the pass hands it; returns its refusals."""
    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_cacheable

    errors, seen = [], []

    def inner(gm, example_inputs):
        seen.append(gm)
        try:
            check_cacheable(gm)
        except BypassAOTAutogradCache as e:
            errors.append(str(e))
        return gm.forward

    tm = BY_NAME[name]
    model = tm(attn)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(progress=False, layout=layout, dynamic=dynamic),
                                backend=inner)
    batch = make_batch(tm, 2, 12, pad="right", seed=4)
    smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=3)).loss.backward()
    assert seen and smodel.regate_report.graphs[-1].sparse
    assert bool(smodel.regate_report.graphs[-1].static_sizes) == (dynamic is None)
    assert smodel.regate_report.graphs[-1].layout == layout
    assert not [n for gm in seen for n in gm.graph.nodes if n.target in (kept_rows, kept_rows_packed)]
    return errors


@pytest.mark.parametrize("name,attn,checkpointing,layout,dynamic", [  # slow: covered by llava's dynamic / gpt_neox's eager
    ("llama", "sdpa", False, "padded", None),
    pytest.param("llama", "sdpa", False, "padded", True, marks=pytest.mark.slow),
    pytest.param("phi", "eager", False, "padded", None, marks=pytest.mark.slow), ("gpt_neox", "eager", False, "padded", None),
    ("llama", "sdpa", True, "padded", None), ("llama", "sdpa", False, "packed", None),
    ("llava", "sdpa", True, "packed", None), ("llava", "sdpa", True, "packed", True)])
def test_rewritten_graph_passes_the_aot_autograd_cache_check(name, attn, checkpointing, layout, dynamic):
    # The kernel calls are marked as wrapped functions with a cache hash, and every node the rewrite
    # adds carries a fake value: a warm cache can then skip AOTAutograd's trace and partitioning.
    # Both for the static first graph (dynamic=None) and a symbolic one.
    assert _cacheability_errors(name, attn, checkpointing, layout, dynamic) == []


_WARM_SCRIPT = """
import json
from torch._dynamo.utils import counters
import regate_fx
from tests.helpers import make_batch, random_keep
from tests.models import BY_NAME
tm = BY_NAME["llama"]
smodel = regate_fx.sparsify(tm("sdpa"), regate_fx.SparsifyConfig(progress=False, layout=LAYOUT), backend="inductor")
for t in (12, 10):  # the static first graph, then the symbolic one (a new length)
    batch = make_batch(tm, 2, t, pad="right", seed=4)
    smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=3)).loss.backward()
print(json.dumps({"aot": dict(counters["aot_autograd"]), "inductor": dict(counters["inductor"])}))
"""


def _fresh_process_counters(cache_dir, layout: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=root)
    script = f"LAYOUT = {layout!r}\n" + _WARM_SCRIPT
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.inductor
@pytest.mark.parametrize("layout", ["padded", "packed"])  # packed: the CPU varlen custom op in the graph
def test_a_second_process_reuses_the_compiled_sparse_graph(tmp_path, layout):
    cold = _fresh_process_counters(tmp_path, layout)
    assert cold["aot"].get("autograd_cache_miss") == 2, cold  # static first graph + symbolic graph
    warm = _fresh_process_counters(tmp_path, layout)
    # Both sparse graphs are found in AOTAutograd's cache: no joint trace, no partition, no inductor compile.
    assert warm["aot"].get("autograd_cache_hit") == 2, warm
    assert not warm["aot"].get("autograd_cache_miss") and not warm["aot"].get("autograd_cache_bypass"), warm
    assert not warm["inductor"].get("fxgraph_cache_miss"), warm


def test_filling_values_leaves_saved_tensor_hooks_alone():
    # The values are computed with fake tensors while a user's saved-tensor hooks may be active (a
    # memory probe around the first call): the hooks must see real tensors only.
    import torch

    tm = BY_NAME["llama"]
    smodel = regate_fx.sparsify(tm("sdpa"), regate_fx.SparsifyConfig(progress=False),
                                backend=lambda gm, example_inputs: gm.forward)  # a callable: values filled
    batch = make_batch(tm, 2, 12, seed=4)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(type(t)) or t, lambda t: t):
        smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=3))
    assert seen and all(t is torch.Tensor or t is torch.nn.Parameter for t in seen), set(seen)


def test_the_one_recompile_of_dynamic_none_is_announced(monkeypatch):
    # On a terminal, the first sparse call shows a spinner, and so does the call whose new sizes
    # recompile the static first graph; a call with the first call's sizes shows nothing.
    import contextlib

    import rich.console

    shown = []
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    monkeypatch.setattr(rich.console.Console, "status",
                        lambda self, msg, **kw: shown.append(msg) or contextlib.nullcontext())
    tm = BY_NAME["llama"]
    smodel = regate_fx.sparsify(tm("sdpa"), regate_fx.SparsifyConfig(return_logits=False),
                                backend=lambda gm, example_inputs: gm.forward)
    for t in (12, 12, 10):
        batch = make_batch(tm, 2, t, seed=4)
        smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=3))
        shown.append("|")
    assert [m.split(":")[1].strip()[:9] if m != "|" else m for m in shown] == \
        ["capturing", "|", "|", "new sizes", "|"], shown
    assert smodel.regate_report.graphs[0].static_sizes and not smodel.regate_report.graphs[-1].static_sizes
