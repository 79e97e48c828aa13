"""TGI's native API: /generate, /generate_stream, /, /tokenize, /info, health; schemas, rules."""
