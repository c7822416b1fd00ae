"""regate_fx/compat.py: each shim still matches the upstream internal it works around.

A failure here means torch or transformers changed under a shim: read the shim's docstring, then
adapt it or delete it (and this test) if upstream no longer needs it.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.checkpoint import checkpoint

import regate_fx
from regate_fx import compat
from tests.models import BY_NAME
from tests.toy import SelectedState, SelectingBlock


# --- check_environment ------------------------------------------------------------------------

def test_the_installed_environment_passes_the_check():
    compat.check_environment.cache_clear()
    compat.check_environment()


@pytest.mark.parametrize("name,version", [("transformers", "4.57.1"), ("transformers", "6.0.0"), ("torch", "2.12.0")])
def test_a_version_outside_the_range_is_refused_with_the_fix(monkeypatch, name, version):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda n: version if n == name else real(n))
    monkeypatch.delenv(compat.SKIP_CHECK_ENV, raising=False)
    compat.check_environment.cache_clear()
    try:
        with pytest.raises(compat.UnsupportedEnvironment, match=rf"needs {name}.*found {version}.*pip install"):
            regate_fx.sparsify(BY_NAME["llama"]("sdpa"))
        monkeypatch.setenv(compat.SKIP_CHECK_ENV, "1")
        compat.check_environment.cache_clear()
        compat.check_environment()  # the escape hatch the message names
    finally:
        compat.check_environment.cache_clear()


def test_the_ranges_come_from_the_installed_metadata():
    reqs = compat._requirements()
    assert set(reqs) == {"torch", "transformers"}, reqs  # pyproject.toml's [project.dependencies]
    assert all(r.startswith(">=") or "," in r for r in reqs.values())


def test_a_torch_build_without_dynamo_is_refused(monkeypatch):
    import torch._dynamo.eval_frame as ef

    monkeypatch.setattr(ef, "is_dynamo_supported", lambda: False)
    compat.check_environment.cache_clear()
    try:
        with pytest.raises(compat.UnsupportedEnvironment, match="torch.compile"):
            compat.check_environment()
    finally:
        compat.check_environment.cache_clear()


# --- capture_settings ------------------------------------------------------------------------

def test_dynamo_still_refuses_side_effects_under_checkpointing_without_the_setting():
    """The reason for ``skip_fwd_side_effects_in_bwd_under_checkpoint`` in ``capture_settings``. If this
    fails, dynamo now captures such forwards by default: the setting can go."""
    mod = SelectingBlock()
    fn = torch.compile(lambda x: checkpoint(mod, x, use_reentrant=False), backend="eager", fullgraph=True)
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(Exception, match="Unsafe side effect"):
        fn(x)
    torch._dynamo.reset()
    with compat.capture_settings():
        torch.testing.assert_close(fn(x), torch.nn.functional.silu(x) * 3.0)
    assert SelectedState.act is None
    torch._dynamo.reset()


def test_the_private_settings_exist():
    assert hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint")
    assert hasattr(torch.fx.experimental._config, "use_duck_shape")


# --- output-capturing hooks -------------------------------------------------------------------

def test_transformers_installer_is_still_looked_up_at_call_time():
    """``install_output_hooks`` replaces ``install_all_output_capturing_hooks`` in its module for the
    length of a call; that only works while ``recursively_install_hooks`` looks it up there."""
    from transformers.utils import output_capturing as oc

    assert "install_all_output_capturing_hooks" in oc.recursively_install_hooks.__code__.co_names
    assert callable(oc.maybe_install_capturing_hooks)


def test_transformers_still_installs_hooks_lazily_under_a_lock_dynamo_cannot_enter():
    """``needs_output_hooks`` recognises this failure by its text; if dynamo stops failing here, or fails
    with another message, the retry in the sparse step is dead code or never taken."""
    model = BY_NAME["llama"]("sdpa").model
    ids = torch.randint(3, 90, (1, 6))
    fn = torch.compile(lambda: model(input_ids=ids, output_hidden_states=True).hidden_states, backend="eager",
                       fullgraph=True)
    with pytest.raises(Exception) as err:
        fn()
    assert compat.needs_output_hooks(err.value), str(err.value)[:500]
    torch._dynamo.reset()


def test_installing_hooks_twice_hooks_each_module_once():
    """transformers' installer recursing from an outer model into an already hooked sub-model hooks it
    again (the reason for the shim); the shim's result carries one hook per module."""
    from tests.models import BY_NAME as models

    llava = models["llava"]("sdpa")
    tower = llava.model.vision_tower
    from transformers.utils import output_capturing as oc

    oc.maybe_install_capturing_hooks(tower)
    per_module = {n: len(m._forward_hooks) for n, m in tower.named_modules()}
    compat.install_output_hooks(llava)
    assert {n: len(m._forward_hooks) for n, m in tower.named_modules()} == per_module


# --- Trainer resume of renamed checkpoints ----------------------------------------------------

def test_the_weight_renaming_api_is_still_there():
    """``reload_renamed_weights`` applies ``save_pretrained``'s key renames with these functions."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key  # noqa: F401

    llava = BY_NAME["llava"]("sdpa")
    assert any(isinstance(c, WeightRenaming) for c in get_model_conversion_mapping(llava)), \
        "LLaVA has no renames any more: check whether Trainer's resume still needs reload_renamed_weights"
    assert transformers.__version__  # the version is in the failure report
