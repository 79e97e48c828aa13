"""HTTP handlers: translate HTTP requests to internal requests and back."""
