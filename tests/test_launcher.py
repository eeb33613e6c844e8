"""The benchmarks' server launcher: one argv builder, the child's whole environment, thread pins."""
from __future__ import annotations

from pathlib import Path

import djinn
from djinn.reproducibility import deterministic_region

from benchmarks.launcher import ServerLauncher, ServerSpec, cpu_server, server_argv, server_environment
from benchmarks.threads import ThreadPlan, plan_threads


def test_thread_plan_uses_the_cores_once_between_client_and_server():
    assert plan_threads(2) == ThreadPlan(2, 1, 1)
    assert plan_threads(16) == ThreadPlan(16, 8, 8)
    assert plan_threads(3) == ThreadPlan(3, 1, 1), "the same count on both sides, or CPU logits differ"
    assert plan_threads(1) == ThreadPlan(1, 1, 1), "one core: each process still gets a thread"


def test_server_argv_writes_each_option_once():
    assert server_argv(ServerSpec("cpu")) == ["--device", "cpu", "--log-level", "INFO", "--deterministic", "--exact"]
    argv = server_argv(ServerSpec("cuda:0", deterministic=False, exact=False, vram_budget_gb=10.0,
                                  ring_buffer_gb=2.0, disable_kv_swap=True))
    assert argv == ["--device", "cuda:0", "--log-level", "INFO", "--vram-budget-gb", "10.0",
                    "--ring-buffer-gb", "2.0", "--disable-kv-swap"]


def test_server_environment_pins_threads_and_sets_only_the_servers_kernels():
    threads = ThreadPlan(2, 1, 1)
    base = {"PATH": "/bin", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "8"}
    env = server_environment(ServerSpec("cpu", deterministic=False), threads, base)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert server_environment(ServerSpec("cpu"), threads, {})["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in raw if b"=" in entry)


def test_nothing_this_process_set_reaches_a_server(tmp_path):
    """A server started inside this process's deterministic region without --deterministic runs
    without cuBLAS's fixed workspace, and with the pinned thread count."""
    launcher = ServerLauncher(tmp_path, ThreadPlan(2, 1, 1))
    with deterministic_region():
        server = launcher.start("plain", ServerSpec("cpu", deterministic=False))
    try:
        env = _environ(server.process.pid)
        assert "CUBLAS_WORKSPACE_CONFIG" not in env and env["OMP_NUM_THREADS"] == "1"
        with djinn.connect(server.host_port) as client:
            assert client.hello()["deterministic_kernels"] is False
        assert launcher.started_by("(session)")[0].process is server
        assert launcher.describe()[0]["kernels"] == {"deterministic": False, "CUBLAS_WORKSPACE_CONFIG": None}
    finally:
        launcher.stop_all()


def test_a_server_dies_with_the_process_that_started_it(tmp_path):
    """A pytest killed mid-run must not leave its servers computing on the cores."""
    import subprocess
    import sys
    import time

    script = ("import sys; from pathlib import Path; from djinn.server.process import ServerProcess; "
              f"s = ServerProcess('--device', 'cpu', log_path=Path({str(tmp_path / 'log')!r})).start(); "
              "print(s.process.pid, flush=True); import time; time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{server_pid}").exists():
        status = Path(f"/proc/{server_pid}/status").read_text() if Path(f"/proc/{server_pid}").exists() else ""
        if "State:\tZ" in status:
            break
        time.sleep(0.1)
    alive = Path(f"/proc/{server_pid}").exists() and "State:\tZ" not in Path(f"/proc/{server_pid}/status").read_text()
    assert not alive, f"server {server_pid} outlived its parent"


def test_a_tests_cpu_server_keeps_the_clis_defaults():
    assert server_argv(cpu_server("--session-ttl-s", "1")) == ["--device", "cpu", "--log-level", "INFO",
                                                               "--session-ttl-s", "1"]
    assert cpu_server("--deterministic").deterministic


def test_a_failing_test_reports_the_log_of_every_server_it_started(pytester):
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(test_fails="""
        def test_fails(start_server):
            start_server()
            start_server("--session-ttl-s", "5")
            assert False
        def test_passes(start_server):
            start_server()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert out.count("djinn server log (") == 2, "both servers of the failing test, none of the passing one"
    assert "djinn server listening" not in out or "INFO" in out
