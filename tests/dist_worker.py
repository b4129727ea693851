"""Run several ``lmprune prune`` commands in one torchrun worker (one process group for all of them), so the
2-rank tests pay for the process start-up once: ``torchrun ... tests/dist_worker.py JOBS.json``, where the file
holds a list of argument lists."""

import json
import sys

import torch

from lmprune import distributed
from lmprune.cli import main

torch.set_num_threads(1)
distributed.init("cpu")
codes = [main(argv) for argv in json.loads(open(sys.argv[1]).read())]
distributed.shutdown()
sys.exit(max(codes))
