"""The shard format and storage: what extraction writes and training and the tools read; the commit records and
the lease of a folder a run writes."""
