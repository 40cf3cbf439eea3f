"""skipjack: faster LLM decoding by working at the level of layers and the KV cache."""

__version__ = "0.1.0"
