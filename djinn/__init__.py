"""Djinn: run PyTorch / HuggingFace language models on a remote GPU server, semantically.

    import djinn
    client = djinn.connect("127.0.0.1:5556")
    remote = client.load(djinn.models.build("tiny-llama"), mode="full_djinn")
    ids = remote.generate(input_ids, max_new_tokens=50)
"""
from djinn import models
from djinn.client import Client, GenerationStats, RemoteModel, RemoteSession, connect
from djinn.modes import MODES, resolve as resolve_mode

__all__ = ["models", "connect", "Client", "RemoteModel", "RemoteSession", "GenerationStats", "MODES", "resolve_mode"]
