"""The ways in: the OpenAI-compatible HTTP server and its serving classes."""
