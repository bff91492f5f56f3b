"""The embedded default: a tiny Ring-linear checkpoint, its tokenizer, a recall task, and a trainer."""
