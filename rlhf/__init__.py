"""rlhf: preference data, the Bradley-Terry reward model, SFT, DPO (and variants), KL control, the gold scorer.

Sits on ``pretrain`` and never imports ``envs`` or ``agents``. Ships the default sentiment reward
model (``default_reward_model_dir()``), trained on preferences labelled by the VADER gold scorer.
"""

from rlhf.reward_model import RewardModel, default_reward_model_dir

__all__ = ["RewardModel", "default_reward_model_dir"]
