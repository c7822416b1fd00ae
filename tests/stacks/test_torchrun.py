"""A `torchrun` launch (`python -m torch.distributed.run --standalone --nproc_per_node 2`, env://
rendezvous, gloo on CPU), as users start multi-GPU jobs; the other multi-rank tests spawn their ranks
with torch.multiprocessing. The launched script is tests/stacks/torchrun_worker.py. Each rank's loss
and full gradients equal one process's, computed here by the spawn tests' references:

- DDP over a sparsified Llama above DDP's first bucket: every rank's own sparse loss, the mean of
  the ranks' gradients (`tests.test_distributed._sparse_per_rank`);
- per-layer FSDP2 with `execution="gathered"`: every rank's oracle loss and the mean of the ranks'
  oracle gradients (`tests.test_fsdp_per_layer._reference`), fp32 within 1e-5; the ReGate state
  after `update` is the same on both ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import LOSS_ATOL, assert_close, assert_grads_close
from tests.test_distributed import BIG, _sparse_per_rank
from tests.test_fsdp_per_layer import TINY, _reference

WORLD = 2
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 600.0


def torchrun(script: Path, args: list[str], out: Path, nproc: int = WORLD, timeout: float = TIMEOUT) -> None:
    """Run `script` under torchrun (CPU, one thread per rank, this checkout first on the path); fail
    with the launcher's output if it exits non-zero or is still running after `timeout` seconds (its
    whole process group, launcher and ranks, is then killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    log = out / "torchrun.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks (their own session)
            proc.wait()
            raise AssertionError(f"torchrun still running after {timeout:.0f} s (a rank waiting in a collective the "
                                 f"other never entered?); its output:\n{log.read_text()[-4000:]}") from None
    assert rc == 0, f"torchrun exited with {rc}; its output:\n{log.read_text()[-6000:]}"


def test_torchrun_ddp_and_per_layer_fsdp2_equal_one_process(tmp_path):
    torchrun(ROOT / "tests" / "stacks" / "torchrun_worker.py", [str(tmp_path)], tmp_path)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in range(WORLD):  # torchrun's variables reached the ranks, which ran this checkout's package
        assert got[r]["world"] == WORLD and got[r]["env"] == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}
        assert Path(got[r]["package"]).resolve().is_relative_to(ROOT), got[r]["package"]

    losses, per_rank = _sparse_per_rank(BIG)
    want = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
    for r in range(WORLD):
        res = got[r]["ddp"]
        assert res["sparse_graphs"] >= 1, "DDP ran without its sparse graph"
        assert_close(res["loss"], losses[r], f"rank {r} loss under DDP", atol=LOSS_ATOL, rtol=0)
        assert_grads_close(res["grads"], want)  # DDP averages the ranks' gradients

    losses, want = _reference(TINY)
    for r in range(WORLD):
        res = got[r]["fsdp_per_layer"]
        assert res["sharded"], "parameters are not FSDP2 shards"
        assert abs(float(res["loss"] - losses[r])) <= 1e-5, (r, float(res["loss"]), float(losses[r]))
        assert set(res["grads"]) == set(want)
        for n in want:
            torch.testing.assert_close(res["grads"][n], want[n], atol=1e-5, rtol=1e-4, msg=f"rank {r} grad {n}")
    a, b = (got[r]["fsdp_per_layer"]["regate"] for r in range(WORLD))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=f"store {k}")
        else:
            assert a[k] == b[k], k
