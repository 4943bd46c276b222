"""Models: building causal LMs and reward models (scratch or hub), LoRA, batched sampling, log-probs, and the gold
judges that score text."""
