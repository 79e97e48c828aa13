"""tgserve: a fast, observable LLM inference server, drop-in for Text Generation Inference."""

__version__ = "0.1.0"
