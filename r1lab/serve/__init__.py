"""Serving: an OpenAI-compatible API with reasoning_content, a web chat page and a terminal chat.

engine (continuous batching on one thread) <- service (the model behind the API) <- app (HTTP) / terminal (chat);
protocol holds the wire format.
"""
