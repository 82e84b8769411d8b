"""agents: PPO, REINFORCE, GRPO, TRPO and DQN (with replay buffers) fine-tuning the LM, SB3 adapters, the CLI, logging.

The top layer: it may import ``envs``, ``rlhf`` and ``pretrain``; nothing imports it.
"""
