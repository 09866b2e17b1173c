"""Input side: sources, tokenizer, sequence building and grain pipelines."""
