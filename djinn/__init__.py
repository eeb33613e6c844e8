"""Djinn."""
