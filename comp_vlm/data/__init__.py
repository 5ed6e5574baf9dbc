"""Data: tokenizers/processors for tiny models and the synthetic worlds."""
