"""Shared builders for the runtime tests: tiny random-weight models and synthetic data."""

from __future__ import annotations

import socket

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VOCAB = 128
PAD = 0
IMAGE_ID = 127


def llama_config(vocab_size: int = VOCAB, **kw) -> LlamaConfig:
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size)).eval()


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8, projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def synthetic_dataset(
    n: int = 24, seed: int = 0, min_len: int = 6, max_len: int = 20, n_image: int = 0
) -> list[dict]:
    """Samples: optional image tokens, a prompt (labels -100), an answer (supervised)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, IMAGE_ID - 1, (L,), generator=g)
        ids[1 : 1 + min(n_image, L - 3)] = IMAGE_ID
        labels = ids.clone()
        prompt = max(1, min(L - 2, L // 3 + n_image))
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels, "sample_id": i})
    return out


def file_store(directory) -> str:
    """A ``file://`` init_method in ``directory`` (a fresh directory per test): unlike a TCP port, it
    cannot collide with another job's process group on a shared machine."""
    import os

    path = os.path.join(str(directory), "process-group-store")
    assert not os.path.exists(path), "a file store must not exist before init_process_group"
    return f"file://{path}"


def spawn_ranks(fn, args: tuple, nprocs: int, timeout: float = 300.0) -> None:
    """``torch.multiprocessing.spawn`` with a deadline: ranks left waiting (in a collective some rank
    never joined) fail the test after ``timeout`` seconds, naming them, instead of hanging until
    pytest's own timeout. A rank that raises fails it at once, as with ``mp.spawn``."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"ranks {alive} of {nprocs} still running after {timeout:.0f} s: waiting in a "
                                 f"collective the other ranks never entered?")


def exit_rank() -> None:
    """End a spawned rank that finished its work (results saved, process group destroyed) without
    running interpreter teardown. torch's gloo teardown can deadlock there: freeing DDP's Reducer
    destroys the ProcessGroupGloo, whose destructor joins its worker threads while holding the GIL,
    and a worker finishing an allreduce needs the GIL to drop a Python object from its thread-local
    state (seen in 2 of ~10 full runs: py-spy showed exactly those two stacks). Only the success path
    calls this: a rank that raises still reports its error to the parent."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingTeacher:
    """Wraps a teacher: counts reference_losses calls, optionally sleeps or blocks.

    The fingerprint and pad id are the wrapped teacher's, so caches are interchangeable.

    Args:
        inner: a teacher (e.g. a TextTeacher).
        delay: seconds to sleep per call.
        block_after: if set, the call after this many calls sleeps forever (to be killed).
    """

    def __init__(self, inner, delay: float = 0.0, block_after: int | None = None) -> None:
        self.inner = inner
        self.pad_token_id = inner.pad_token_id
        self.delay = delay
        self.block_after = block_after
        self.calls = 0
        self.batch_sizes: list[int] = []

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def reference_losses(self, input_ids, attention_mask=None, labels=None, visual_mask=None):
        import time

        if self.block_after is not None and self.calls >= self.block_after:
            time.sleep(3600)
        if self.delay:
            time.sleep(self.delay)
        self.calls += 1
        self.batch_sizes.append(int(input_ids.shape[0]))
        return self.inner.reference_losses(input_ids, attention_mask, labels, visual_mask)


def llama_teacher(seed: int = 0):
    """A TextTeacher over a tiny random Llama (its own student for the vocabulary check)."""
    from regate_fx.runtime.teacher import causal_lm_teacher

    lm = tiny_llama(seed)
    return causal_lm_teacher(lm, student=lm)
