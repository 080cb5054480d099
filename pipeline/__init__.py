"""Qwen-Image-Edit shard pipeline.

Layers, each importing only from the ones above it:

* ``pipeline.shards``  — the shard format and storage (writing, commit records, reading)
* ``pipeline.common``  — images, prompts, the VLM encoder, shared CLI flags, logging
* ``pipeline.extract`` — step 1, JSONL → shards (``python -m pipeline.extract``)
* ``pipeline.train``   — step 2, shards → trained weights (``python -m pipeline.train``)
* ``pipeline.kit``     — the offline tiny model and sample data
"""
