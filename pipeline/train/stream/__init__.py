"""The data stream: tasks mixed by weight and source count into batches, resumable exactly."""
