"""rlhf: preference data, the Bradley-Terry reward model, SFT, DPO (and variants), KL control, the gold scorer.

Sits on ``pretrain`` and never imports ``envs`` or ``agents``.
"""
