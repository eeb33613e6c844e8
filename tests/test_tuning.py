"""The server adopts the receive tunables by re-executing itself, once."""
from __future__ import annotations

import djinn
from djinn.transport.tuning import TUNABLES_ENV, RECEIVE_TUNABLES, is_tuned, tuned_environment


def test_tuned_environment_keeps_other_tunables_and_replaces_ours():
    env = tuned_environment({TUNABLES_ENV: "glibc.malloc.hugetlb=0:glibc.pthread.rseq=0", "X": "1"})
    parts = env[TUNABLES_ENV].split(":")
    assert "glibc.pthread.rseq=0" in parts and "glibc.malloc.hugetlb=0" not in parts
    assert all(t in parts for t in RECEIVE_TUNABLES) and env["X"] == "1"
    assert is_tuned(env) and not is_tuned({}) and tuned_environment(env) == env


# The server's own word: glibc writes into the process's original environment block
# while parsing the tunables, so /proc/PID/environ does not show them whole.
def test_server_reexecutes_with_the_tunables(start_server):
    server = start_server()
    with djinn.connect(server.host_port) as client:
        assert client.hello()["malloc_tuned"] is True


def test_no_malloc_tuning_keeps_the_environment(start_server, monkeypatch):
    monkeypatch.delenv(TUNABLES_ENV, raising=False)
    server = start_server("--no-malloc-tuning")
    with djinn.connect(server.host_port) as client:
        assert client.hello()["malloc_tuned"] is False
