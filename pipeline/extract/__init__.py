"""Step 1: a JSONL of editing samples → per-task WebDataset shards with VLM prompt embeddings."""
