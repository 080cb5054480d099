"""Operator tools for shard datasets and the offline kits (``python -m shards_tools --help``)."""
