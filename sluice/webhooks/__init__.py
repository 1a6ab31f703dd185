"""Webhooks: signed events (Standard Webhooks), an SSRF-safe client, and the sender loop."""
