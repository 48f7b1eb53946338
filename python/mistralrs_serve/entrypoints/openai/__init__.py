"""The OpenAI API: wire models, one serving class per endpoint, the error table, the app."""
