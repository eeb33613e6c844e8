"""A pool of Djinn servers, one per GPU: placement of models and sessions, and the connection
that routes a client's requests over them (`djinn.connect([addr, ...])` or `djinn.connect("ray:NAME")`).

`placement` decides where models and sessions go, `connection` sends each request there,
`directory` says who the servers are, and `ray_pool` starts and supervises them as Ray actors
(the optional extra `djinn[ray]`).
"""
from djinn.pool.connection import PoolConnection
from djinn.pool.directory import Directory, StaticDirectory, directory_for
from djinn.pool.placement import PlacementPolicy

__all__ = ["PoolConnection", "Directory", "StaticDirectory", "directory_for", "PlacementPolicy"]
