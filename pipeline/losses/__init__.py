"""Losses: pure functions, tensors in and per-example losses out: the DPO family and the online-RL math (advantage
estimators, KL estimators and controllers, PPO's clipped objectives)."""
