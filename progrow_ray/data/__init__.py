"""GPT-2 tokenizer (offline), corpus sources, token shards and the deterministic sampler. No Ray."""
