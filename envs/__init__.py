"""envs: the TextGen Gymnasium environment suite, its batched (KV-cached) vector version, registration.

Sits on ``rlhf`` and ``pretrain`` and never imports ``agents``.
"""
