"""Sluice's HTTP API (FastAPI): OpenAI-compatible files and batches, and single jobs."""
