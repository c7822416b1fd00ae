"""Fuzz test settings: one intra-op thread, and a hypothesis profile that skips shrinking."""

import pytest
import torch
from hypothesis import Phase, settings

# `pytest --hypothesis-profile=fuzz-no-shrink`: report the first failing example as drawn, without
# spending minutes shrinking it (each shrink step compiles a model).
settings.register_profile("fuzz-no-shrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a shared CPU (no spin-waiting workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
