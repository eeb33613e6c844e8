"""Djinn: run PyTorch / HuggingFace language models on a remote GPU server, semantically.

    import djinn
    client = djinn.connect("127.0.0.1:5556")
    remote = client.load(djinn.models.build("tiny-llama"), mode="full_djinn")
    ids = remote.generate(input_ids, max_new_tokens=50)
"""
from importlib.metadata import PackageNotFoundError, version as _installed_version
from pathlib import Path as _Path

from djinn import interventions, models
from djinn.client import Client, GenerationStats, RemoteModel, RemoteSession, connect
from djinn.modes import MODES, resolve as resolve_mode



def _version() -> str:
    """The version written once, in pyproject.toml: from the installed metadata, else from the source tree."""
    try:
        return _installed_version("djinn")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
        import tomllib
        with open(_Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


__version__ = _version()

__all__ = ["__version__", "interventions", "models", "connect", "Client", "RemoteModel", "RemoteSession", "GenerationStats", "MODES", "resolve_mode"]
