"""TGI's native API: /generate, /generate_stream, /, /tokenize, /info, health; its schemas and rules."""
