"""Data: the table schemas every stage boundary validates, tokenizers and chat templates, dataset loading through
`datasets`, and the collators that turn rows into batches."""
