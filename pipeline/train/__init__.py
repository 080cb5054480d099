"""Step 2: stream shards, mix tasks, train the DiT with flow matching under accelerate."""
