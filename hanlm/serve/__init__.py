"""The model service: an OpenAI-compatible HTTP server over any hanlm checkpoint (`hanlm serve`)."""
