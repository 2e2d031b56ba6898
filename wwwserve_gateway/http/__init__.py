"""The node's HTTP side: the ASGI app and its small helpers (auth, errors in OpenAI's shape, SSE),
the admin API and the network's read-only views."""
