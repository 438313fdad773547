"""Hostile programs run through `fedsdr.sandbox.run_python` stay contained.

Each test runs with every layer on (the default) and, where it shows something, with one layer
switched off: `audit_hook=False` shows what the OS layers (namespaces, rlimits, process group)
hold alone, `namespaces=False` what rlimits, the process group and the audit hook hold alone
(macOS and Linux without user namespaces). A case whose OS layer this machine refuses is
skipped, never run unconfined: `enforced` says which layers held.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import threading
import time
import uuid

import pytest

from fedsdr import sandbox
from fedsdr.sandbox import run_python

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX")

ALL = {}
OS_ONLY = {"audit_hook": False}
HOOK_ONLY = {"namespaces": False}
LAYERS = pytest.mark.parametrize("layers", [ALL, OS_ONLY, HOOK_ONLY], ids=["all", "os", "hook"])


def _program(src: str) -> str:
    return textwrap.dedent(src).lstrip()


def _probe(**layers) -> dict[str, bool]:
    """Which layers hold here with these switches (a harmless program)."""
    res = run_python("pass", timeout=10, **layers)
    assert res.ok, res.stderr
    return res.enforced


def _require(layers: dict, *mechanisms: str) -> dict[str, bool]:
    enforced = _probe(**layers)
    missing = [m for m in mechanisms if not enforced[m]]
    if missing:
        pytest.skip(f"not enforced on this machine: {', '.join(missing)}")
    return enforced


def _processes_with(token: str) -> list:
    """Live (non-zombie) processes whose command line carries `token`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(token in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _in_group(pgid: int) -> list[int]:
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                alive.append(proc.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return alive


# -- ordinary programs ---------------------------------------------------------------------------


def test_passing_failing_and_broken_programs() -> None:
    ok = run_python("print('hi')\nassert 1 + 1 == 2\n", timeout=10)
    assert ok.ok and ok.returncode == 0 and ok.stdout == "hi\n" and not ok.timed_out
    assert ok.killed_reason is None
    failing = run_python("assert 1 + 1 == 3, 'nope'\n", timeout=10)
    assert failing.returncode == 1 and "AssertionError: nope" in failing.stderr
    assert run_python("def f(:\n", timeout=10).returncode == 1  # a syntax error
    exits = run_python("import sys\nsys.exit(3)\n", timeout=10)
    assert exits.returncode == 3 and not exits.ok


def test_the_program_is_main_and_can_use_its_temp_folder() -> None:
    res = run_python(_program("""
        import os, tempfile
        assert __name__ == "__main__"
        with open("scratch.txt", "w") as f:
            f.write("x")
        with tempfile.NamedTemporaryFile("w") as f:
            f.write("y")
        assert os.path.realpath(os.getcwd()) == os.path.realpath(os.environ["HOME"])
        print(open("scratch.txt").read())
    """), timeout=10)
    assert res.ok, res.stderr
    assert res.stdout == "x\n"


def test_the_enforced_flags_cover_every_mechanism() -> None:
    enforced = _probe()
    assert set(enforced) == set(sandbox.MECHANISMS)
    for always in ("environment", "process_group", "cpu", "file_size", "core", "open_files",
                   "audit_hook"):
        assert enforced[always], always
    if sys.platform.startswith("linux"):
        assert enforced["memory"]  # macOS accepts RLIMIT_AS and ignores it
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        # root on Linux can always make the network, PID and mount namespaces
        assert enforced["network"] and enforced["pid_namespace"]
        assert enforced["filesystem_read_only"] and enforced["capabilities_dropped"]
    off = _probe(namespaces=False, audit_hook=False)
    assert not off["audit_hook"] and not off["network"] and not off["pid_namespace"]


def test_concurrent_runs_do_not_mix() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        res = run_python(f"import sys\nprint({i})\nsys.exit({i % 3})\n", timeout=20)
        assert res.returncode == i % 3, res.stderr
        return res.stdout

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(12))) == [f"{i}\n" for i in range(12)]


def test_capabilities_are_dropped() -> None:
    _require(ALL, "capabilities_dropped")
    res = run_python(_program("""
        for line in open("/proc/self/status"):
            if line.startswith(("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs")):
                print(line.strip())
    """), timeout=10)
    assert res.ok, res.stderr
    caps = dict(line.split(":\t") for line in res.stdout.splitlines())
    assert int(caps["CapEff"], 16) == int(caps["CapPrm"], 16) == int(caps["CapBnd"], 16) == 0
    assert caps["NoNewPrivs"] == "1"


# -- hostile programs ----------------------------------------------------------------------------


@LAYERS
def test_environment_secret_is_not_visible(layers: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    if layers is OS_ONLY:
        _require(layers, "private_proc")  # else /proc/PID/environ of the scorer is readable
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("FEDSDR_TEST_SECRET", secret)
    # os.environ, and every /proc/PID/environ it can read (the scorer's own among them when
    # there is no PID namespace).
    res = run_python(_program("""
        import os
        print(os.environ.get("FEDSDR_TEST_SECRET"))
        print(sorted(os.environ))
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    print(open(f"/proc/{pid}/environ", "rb").read())
                except OSError as e:
                    print(pid, type(e).__name__)
    """), timeout=10, **layers)
    assert res.ok, res.stderr
    assert secret not in res.stdout and secret not in res.stderr
    assert res.stdout.startswith("None\n")
    assert "FEDSDR_TEST_SECRET" not in res.stdout


@LAYERS
def test_writing_outside_the_temp_folder_is_refused(layers: dict, tmp_path) -> None:
    if layers is OS_ONLY:
        _require(layers, "filesystem_read_only")
    target = tmp_path / "escaped.txt"
    moved = tmp_path / "keep.txt"
    moved.write_text("mine")
    res = run_python(_program(f"""
        import os, shutil
        attempts = []
        def attempt(name, fn):
            try:
                fn()
                attempts.append(name + " WROTE")
            except OSError as e:
                attempts.append(name + " refused " + type(e).__name__)
        attempt("open", lambda: open({str(target)!r}, "w").write("x"))
        attempt("os.open", lambda: os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)))
        def via_dir_fd():
            d = os.open({str(tmp_path)!r}, os.O_RDONLY)
            os.close(os.open("escaped.txt", os.O_CREAT | os.O_WRONLY, dir_fd=d))
        attempt("dir_fd", via_dir_fd)
        def via_symlink():
            os.symlink({str(target)!r}, "link")
            open("link", "w").write("x")
        attempt("symlink", via_symlink)
        attempt("rename", lambda: os.rename({str(moved)!r}, "stolen.txt"))
        attempt("remove", lambda: os.remove({str(moved)!r}))
        attempt("shutil", lambda: shutil.copy("/etc/hostname", {str(target)!r}))
        print("\\n".join(attempts))
    """), timeout=10, **layers)
    assert res.ok, res.stderr
    assert "WROTE" not in res.stdout, res.stdout
    assert not target.exists() and not (tmp_path / "escaped.txt").exists()
    assert moved.read_text() == "mine"


def test_the_temp_folder_is_private_and_removed(tmp_path) -> None:
    res = run_python("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\n",
                     timeout=10)
    assert res.ok, res.stderr
    assert not os.path.exists(res.stdout.strip())


@LAYERS
def test_file_size_is_capped(layers: dict) -> None:
    res = run_python(_program("""
        with open("big.bin", "wb") as f:
            f.write(b"x" * (3 * 1024 * 1024))
    """), timeout=10, max_file_mb=1, **layers)
    assert not res.ok
    assert "File too large" in res.stderr or res.killed_reason == "file_size_limit"


@LAYERS
def test_socket_to_a_local_listener_does_not_connect(layers: dict) -> None:
    if layers is OS_ONLY:
        _require(layers, "network")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        port = server.getsockname()[1]
        res = run_python(_program(f"""
            import socket
            try:
                s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("CONNECTED")
                s.sendall(b"leak")
            except OSError as e:
                print("refused", type(e).__name__, e)
        """), timeout=10, **layers)
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    assert res.ok, res.stderr
    assert res.stdout.startswith("refused"), res.stdout


@pytest.mark.parametrize("layers", [ALL, HOOK_ONLY], ids=["all", "hook"])
def test_ctypes_and_the_gc_are_refused_by_the_audit_hook(layers: dict) -> None:
    # ctypes would call the C library past the hook; gc.get_objects would find the
    # bootstrap's objects
    res = run_python("import ctypes\nprint('LOADED')\n", timeout=10, **layers)
    assert res.returncode == 1 and "LOADED" not in res.stdout
    assert "sandbox: import ctypes is not allowed" in res.stderr
    res = run_python("import gc\nprint(len(gc.get_objects()))\n", timeout=10, **layers)
    assert res.returncode == 1 and "sandbox: gc.get_objects is not allowed" in res.stderr


@LAYERS
def test_memory_bomb_is_stopped(layers: dict) -> None:
    _require(layers, "memory")
    me = psutil.Process()
    before = me.memory_info().rss
    res = run_python(_program("""
        hoard = []
        while True:
            hoard.append(bytearray(50 * 1024 * 1024))
    """), timeout=20, memory_mb=256, **layers)
    assert not res.ok and not res.timed_out
    assert "MemoryError" in res.stderr or res.killed_reason is not None, res
    assert me.memory_info().rss < before + 50 * 1024 * 1024  # the scorer is unaffected
    big = run_python("x = bytearray(8 * 1024 ** 3)\n", timeout=20, memory_mb=256, **layers)
    assert big.returncode == 1 and "MemoryError" in big.stderr


def test_fork_is_refused_by_the_audit_hook() -> None:
    res = run_python(_program("""
        import os, subprocess
        for spawn in (os.fork, lambda: subprocess.run(["true"]), lambda: os.system("true")):
            try:
                spawn()
                print("SPAWNED")
            except PermissionError as e:
                print(e)
    """), timeout=10)
    assert res.ok, res.stderr
    assert "SPAWNED" not in res.stdout and res.stdout.count("is not allowed") == 3


@pytest.mark.parametrize("layers", [ALL, OS_ONLY], ids=["all", "os"])
def test_fork_bomb_is_contained(layers: dict) -> None:
    if layers is OS_ONLY:
        # never unleashed where nothing caps the processes (e.g. root without user namespaces)
        _require(layers, "processes")
    token = uuid.uuid4().hex
    res = run_python(_program(f"""
        import os, time
        # {token}
        start = time.monotonic()
        failures = 0
        while time.monotonic() - start < 30:
            try:
                os.fork()
            except BlockingIOError:
                failures += 1
        """), timeout=2, max_processes=16, **layers)
    if layers is ALL:
        assert res.returncode == 1 and "os.fork is not allowed" in res.stderr
    else:
        assert res.timed_out and res.killed_reason == "timeout"
    assert _in_group(res.pid) == []
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE]
    # the machine is fine: new processes start and the sandbox still works
    assert run_python("print(1)", timeout=10).stdout == "1\n"


def _grandchild_program(token: str, seconds: int, *, leave_group: bool, then: str) -> str:
    # The grandchild ignores SIGTERM, optionally leaves the process group and session, and
    # sleeps under a command line that carries `token` (so the test can find it).
    return _program(f"""
        import os, signal, sys, time
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if {leave_group}:
                os.setsid()
            code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep({seconds})"
            os.execv(sys.executable, [sys.executable, "-c", code, "{token}"])
        time.sleep(0.5)
        {then}
    """)


def _run_watching(program: str, token: str, **kw) -> tuple:
    """Run `program`; return its result and the pids that carried `token` while it ran."""
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(p.pid for p in _processes_with(token))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = run_python(program, **kw)
    finally:
        done.set()
        watcher.join()
    return res, seen


@pytest.mark.parametrize("layers", [OS_ONLY, {"namespaces": False, "audit_hook": False}],
                         ids=["os", "no-namespaces-no-hook"])
def test_endless_loop_and_its_grandchild_are_killed_at_the_timeout(layers: dict) -> None:
    token = f"grandchild-{uuid.uuid4().hex}"
    program = _grandchild_program(token, 60, leave_group=False, then="while True: pass")
    start = time.monotonic()
    res, seen = _run_watching(program, token, timeout=2, **layers)
    assert res.timed_out and res.killed_reason == "timeout"
    assert time.monotonic() - start < 10
    assert seen, "the grandchild never started"
    assert _processes_with(token) == []
    for pid in seen:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_grandchild_that_leaves_the_process_group_dies_with_the_pid_namespace() -> None:
    _require(OS_ONLY, "pid_namespace")
    token = f"escapee-{uuid.uuid4().hex}"
    program = _grandchild_program(token, 60, leave_group=True, then="while True: pass")
    res, seen = _run_watching(program, token, timeout=2, **OS_ONLY)
    assert res.timed_out
    assert seen and _processes_with(token) == []


@pytest.mark.parametrize("layers", [OS_ONLY, {"namespaces": False, "audit_hook": False}],
                         ids=["os", "no-namespaces-no-hook"])
def test_a_grandchild_left_behind_by_a_clean_exit_is_killed(layers: dict) -> None:
    token = f"daemon-{uuid.uuid4().hex}"
    program = _grandchild_program(token, 60, leave_group=False, then="print('done')")
    res, seen = _run_watching(program, token, timeout=10, **layers)
    assert res.ok and res.stdout == "done\n", res.stderr
    assert seen and _processes_with(token) == []


def test_grandchild_with_the_audit_hook_never_starts() -> None:
    token = f"grandchild-{uuid.uuid4().hex}"
    program = _grandchild_program(token, 60, leave_group=True, then="while True: pass")
    res, seen = _run_watching(program, token, timeout=2)
    assert res.returncode == 1 and "os.fork is not allowed" in res.stderr
    assert not seen


@pytest.mark.parametrize("layers", [ALL, HOOK_ONLY], ids=["all", "hook"])
def test_the_rlimits_hold_inside(layers: dict) -> None:
    res = run_python(_program("""
        import resource
        for name in ("CPU", "AS", "FSIZE", "CORE", "NOFILE", "NPROC"):
            print(name, *resource.getrlimit(getattr(resource, "RLIMIT_" + name)))
    """), timeout=3.5, memory_mb=300, max_file_mb=5, max_processes=7, max_open_files=40,
        **layers)
    assert res.ok, res.stderr
    limits = {name: (int(soft), int(hard)) for name, soft, hard in
              (line.split() for line in res.stdout.splitlines())}
    assert limits["CPU"] == (6, 7)  # the timeout rounded up, + 2 s; SIGKILL 1 s later
    if res.enforced["memory"]:
        assert limits["AS"] == (300 * 2**20,) * 2
    assert limits["FSIZE"] == (5 * 2**20,) * 2
    assert limits["CORE"] == (0, 0) and limits["NOFILE"] == (40, 40)
    if res.enforced["processes"] and os.geteuid() != 0:  # root: a pids cgroup instead
        assert 7 <= limits["NPROC"][0] < 2**62


def test_killed_reason_names_the_limit() -> None:
    # the program lowers its own CPU limit: SIGXCPU shows as "cpu_limit"
    res = run_python(_program("""
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (1, 5))
        while True:
            pass
    """), timeout=15)
    assert res.killed_reason == "cpu_limit" and res.returncode == -24 and not res.timed_out


# -- the HumanEval scorer ------------------------------------------------------------------------


def test_score_humaneval_runs_contained(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsdr.data.schema import Record
    from fedsdr.scoring import score

    record = Record(
        id="he", instruction="complete", output="", scorer="humaneval",
        meta={"prompt": 'def add(a, b):\n    """Add."""\n',
              "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
              "entry_point": "add"},
    )
    monkeypatch.setenv("FEDSDR_TEST_SECRET", "x")
    good = (
        f"```python\nimport os\nassert os.getpid() != {os.getpid()}\n"
        "assert 'FEDSDR_TEST_SECRET' not in os.environ\n"
        "def add(a, b):\n    return a + b\n```"
    )
    assert score(record, good) is True  # another process, without the scorer's environment
    marker = tmp_path / "pid"
    escaping = (
        f"```python\nopen({str(marker)!r}, 'w').write('x')\n"
        "def add(a, b):\n    return a + b\n```"
    )
    assert score(record, escaping) is False  # the write outside its temp folder fails...
    assert not marker.exists()  # ...and leaves nothing
