"""Tokenizer training, model building/loading, QA formatting and batched scoring."""
