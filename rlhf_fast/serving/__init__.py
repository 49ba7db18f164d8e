"""Talking to a trained model: the terminal chat (`chat.py`) and the OpenAI-compatible HTTP server with
dynamic batching (`server.py`), over the KV-cached generation engine. Conversations use the HH-RLHF
dialogue format the models are trained on (`conversation.py`)."""
