"""The OpenAI-compatible API: chat and text completions, models; parameters, runs and decoding."""
