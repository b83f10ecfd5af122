"""Data: the original JSONL layout, packing, the stateful loader, the built-in demo corpus."""
