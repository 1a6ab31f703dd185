"""Sluice: self-hosted batch inference for open LLMs."""

__version__ = "0.1.0"
