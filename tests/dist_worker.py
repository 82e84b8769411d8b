"""Runs step trainers in each process of a data-parallel launch, for ``tests/test_rlhf_adapters.py``::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_worker.py '[["dpo", {"model": ..., "data": ..., "out": ...}], ["sft", {...}]]'

The argument is a JSON list of ``[command, config fields]``; the trainers run one after the other.
"""

import json
import sys

from rlhf.dpo import DPOConfig, train_dpo
from rlhf.reward_training import RewardConfig, train_reward_model
from rlhf.sft import SFTConfig, train_sft

TRAINERS = {"dpo": (DPOConfig, train_dpo), "sft": (SFTConfig, train_sft), "reward": (RewardConfig, train_reward_model)}

if __name__ == "__main__":
    for command, fields in json.loads(sys.argv[1]):
        config, train = TRAINERS[command]
        train(config(**fields))
