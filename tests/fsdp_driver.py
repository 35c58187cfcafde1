"""Run under torchrun by tests/test_fsdp.py: several training runs in one set of processes.

argv[1]: a JSON list of steps, each {"config": TrainConfig fields} (a run) or {"copy": [from, to]}
(rank 0 copies a run folder). Rank 0 prints one JSON line per run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch.distributed as dist

from peftkit.train.config import TrainConfig
from peftkit.train.run import train


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for step in json.loads(sys.argv[1]):
        if "copy" in step:
            if rank == 0:
                shutil.copytree(*step["copy"])
        else:
            result = train(TrainConfig(**step["config"]), echo=lambda _s: None)
            if rank == 0:
                print(json.dumps(result), flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
