"""The shard format and storage: what extraction writes and training and the tools read."""
