"""HTTP plumbing shared by every part of the node: small ASGI helpers, API-key checks, errors in
OpenAI's shape, and the SSE cutter."""
