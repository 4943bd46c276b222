"""Tasks: the embedded synthetic movie-review task, the `prepare` stage's splits, and preference pairs (sampled and
labelled, or read from a dataset)."""
