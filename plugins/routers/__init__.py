"""The built-in routers: `pos`, the proof-of-stake draw."""
