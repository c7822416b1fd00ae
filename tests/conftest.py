"""Suite-wide settings. Under pytest-xdist (scripts/test.sh runs two workers on a 2-core machine) each
worker computes on one intra-op thread: the tiny models gain nothing from a second thread, and two
workers with two threads each would spin-wait on each other's cores."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
