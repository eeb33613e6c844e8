"""The Djinn server: request loop, executor, weight cache, session store, streamer."""
