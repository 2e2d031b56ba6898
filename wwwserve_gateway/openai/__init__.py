"""The OpenAI-compatible HTTP API: protocol types, serving logic and routes, kept apart."""
