"""Training: the Lightning Trainer and its callbacks, the optimizer, mid-stage checkpoints, and one LightningModule per
method (SFT, reward model, DPO, PPO and the critic-free estimators)."""
