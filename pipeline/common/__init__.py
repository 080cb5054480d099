"""Pieces both halves use: images, prompt templates, the VLM prompt encoder, shared CLI flags, logging."""
