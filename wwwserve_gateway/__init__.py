"""WWW.Serve gateway: an OpenAI/LiteLLM-compatible node of a decentralized LLM serving network."""

__version__ = "0.1.0"
