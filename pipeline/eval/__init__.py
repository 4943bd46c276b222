"""Evaluation: every policy measured against SFT on held-out prompts, the multi-seed reward-KL frontier, and the
reports and plots the stages write."""
