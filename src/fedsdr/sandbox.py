"""Run untrusted Python (model-written HumanEval code) contained.

`run_python(source, timeout=...)` starts `python -I <this file> CONFIG` in a new session (its own
process group) with an emptied environment and a private temp folder as cwd, HOME and TMPDIR.
That bootstrap (the `_boot*` functions below, run before the program and before anything else
is imported) contains the process with what the OS allows, then runs the program:

- Linux namespaces: `unshare(NEWUSER|NEWNS|NEWNET|NEWPID)` (unprivileged user namespaces;
  as root without them, `unshare(NEWNS|NEWNET|NEWPID)`). The program then has no network (a
  new network namespace has only a down loopback), sees only its own processes (a new PID
  namespace with a fresh /proc: the outer ones cannot be signalled, traced or read), and every
  mount is read-only except a size-capped tmpfs on the private temp folder. The program runs
  as a grandchild of the bootstrap under a small init (PID 1 of the namespace); when that init
  ends, the kernel kills whatever is left in the namespace, including processes that left the
  process group. Before the program starts it drops every capability and sets no_new_privs.
- rlimits: CPU seconds, address space, processes (inside a fresh user namespace the count is
  the sandbox's own; otherwise the uid's tasks so far plus the allowance), file size, no core
  files, open files. The kernel exempts root from the process limit (inside a user namespace
  too): as root the sandbox runs in a cgroup (v2, or v1 "pids") of its own with `pids.max`
  where the cgroup file system is writable; the parent also kills whatever is left in it.
- Reads are not confined: the program may read what the scorer's user may read (with no
  network and only a pass/fail verdict leaving the sandbox when scoring).
- A Python audit hook (`sys.addaudithook`, cannot be removed) that refuses sockets, process
  creation (fork, exec, spawn, subprocess, os.system), signals to other processes, ctypes, and
  writes/renames/removals outside the temp folder. It blocks ordinary code on every OS; code
  determined to escape the interpreter can get past it, which the OS layers above are for.

Each layer degrades on its own where the OS refuses it; `SandboxResult.enforced` records which
ones held for the run. At the timeout (and after every run) the parent kills the whole process
group with SIGKILL. The program runs in-process after the bootstrap (no second interpreter) and
ends with `os._exit` after the usual exit steps (threads joined, atexit, streams flushed).
"""

from __future__ import annotations

import os
import sys

# ----------------------------------------------------------------------------------------------
# Child side. `python -I sandbox.py CONFIG` runs this before the heavier imports further down.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MOUNT_ATTR_RDONLY = 0x1
_AT_RECURSIVE = 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every Linux architecture but alpha
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Mount options a user namespace may not clear (the kernel locks them): kept on remounts.
_LOCKED_MOUNT_OPTIONS = {
    "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
    "relatime": 1 << 21, "strictatime": 1 << 24,
}


def _libc():  # noqa: ANN202
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return ctypes, libc


def _check(ctypes, ret: int, what: str) -> None:  # noqa: ANN001
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _boot_namespaces(ctypes, libc, cfg: dict, flags: dict) -> str | None:  # noqa: ANN001
    """unshare what the OS allows; returns which set held ("user", "root") or None."""
    uid, gid = os.getuid(), os.getgid()
    wanted = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID
    if libc.unshare(wanted | _CLONE_NEWUSER) == 0:
        # Map our own ids only (what an unprivileged process may write).
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
        flags["user_namespace"] = True
        held = "user"
    elif os.geteuid() == 0 and libc.unshare(wanted) == 0:
        held = "root"
    else:
        return None
    flags["network"] = True
    flags["pid_namespace"] = True
    return held


def _remount_read_only(ctypes, libc) -> None:  # noqa: ANN001
    """Every mount of this (private) mount namespace read-only (OSError where one stays
    writable)."""

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = libc.syscall(_SYS_MOUNT_SETATTR, -100, b"/", _AT_RECURSIVE, ctypes.byref(attr),
                       ctypes.sizeof(attr))
    if ret == 0:
        return
    # Kernels before 5.12: remount each mount point, deepest first, keeping its locked options.
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in sorted(mounts, key=lambda m: -len(m[4])):
        point = fields[4].encode().decode("unicode_escape").encode()
        extra = sum(_LOCKED_MOUNT_OPTIONS.get(o, 0) for o in fields[5].split(","))
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | extra
        _check(ctypes, libc.mount(None, point, None, flags, None), f"remount {point!r}")


def _boot_filesystem(ctypes, libc, cfg: dict, source: bytes, flags: dict) -> None:  # noqa: ANN001
    """Read-only mounts everywhere, a fresh capped tmpfs on the temp folder."""
    tmp = cfg["tmp"].encode()
    _check(ctypes, libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    _remount_read_only(ctypes, libc)
    flags["filesystem_read_only"] = True
    opts = f"size={cfg['max_temp_mb']}m,mode=0700".encode()
    _check(ctypes, libc.mount(b"tmpfs", tmp, b"tmpfs", _MS_NOSUID | _MS_NODEV, opts), "tmpfs")
    os.chdir(cfg["tmp"])  # the cwd still pointed at the folder under the mount
    with open(os.path.join(cfg["tmp"], "program.py"), "wb") as f:
        f.write(source)
    flags["temp_tmpfs"] = True


def _in_cgroup(path: str) -> bool:
    """Whether this process is in the pids cgroup at `path` (the parent moves it there while
    the interpreter starts; a slow write on cgroup v1), joining it if not: before any fork.
    Root is exempt from RLIMIT_NPROC, even inside a user namespace: the cgroup caps it."""
    marker = "/" + "/".join(path.rstrip("/").split("/")[-2:]) + "\n"
    try:
        with open("/proc/self/cgroup") as f:
            if marker in f.read():
                return True
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        return True
    except OSError:
        return False


def _count_tasks(uid: int) -> int:
    """Tasks (threads included: RLIMIT_NPROC counts them) that `uid` runs now."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                status = f.read()
        except OSError:
            continue
        owner = threads = None
        for line in status.splitlines():
            if line.startswith("Uid:"):
                owner = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if owner == uid:
            count += threads or 1
    return count


def _boot_limits(cfg: dict, flags: dict, namespaced: str | None) -> None:
    import resource

    mb = 1024 * 1024
    cpu = int(cfg["timeout"]) + 2
    limits = {
        "cpu": (resource.RLIMIT_CPU, cpu, cpu + 1),
        "file_size": (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb, cfg["max_file_mb"] * mb),
        "core": (resource.RLIMIT_CORE, 0, 0),
        "open_files": (resource.RLIMIT_NOFILE, cfg["max_open_files"], cfg["max_open_files"]),
    }
    if sys.platform != "darwin":  # macOS accepts RLIMIT_AS and does not enforce it
        limits["memory"] = (resource.RLIMIT_AS, cfg["memory_mb"] * mb, cfg["memory_mb"] * mb)
    nproc = getattr(resource, "RLIMIT_NPROC", None)
    # The kernel exempts uid 0 from RLIMIT_NPROC, inside a user namespace too (the pids cgroup
    # is root's cap). Inside a fresh user namespace the count is the sandbox's own (the
    # bootstrap, the init, the program's); otherwise every task of the uid counts.
    if nproc is not None and sys.platform.startswith("linux") and os.geteuid() != 0:
        if namespaced == "user":
            n = cfg["max_processes"] + 2
        else:
            n = _count_tasks(os.getuid()) + cfg["max_processes"]
        limits["processes"] = (nproc, n, n)
    for name, (which, soft, hard) in limits.items():
        if name == "processes" and flags.get("processes"):
            continue  # capped by the pids cgroup already
        try:
            old_soft, old_hard = resource.getrlimit(which)
            if old_hard != resource.RLIM_INFINITY:
                hard = min(hard, old_hard)
                soft = min(soft, hard)
            resource.setrlimit(which, (soft, hard))
            flags[name] = True
        except (OSError, ValueError):
            flags[name] = False


def _drop_capabilities(ctypes, libc, flags: dict) -> None:  # noqa: ANN001
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last one: ignored
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(ctypes, libc.capset(header, data), "capset")
    flags["capabilities_dropped"] = True


def _install_audit_hook(root: str) -> None:
    """Refuse what a HumanEval program never needs. Raises PermissionError in the program."""
    realpath = os.path.realpath
    sep = os.sep
    root = realpath(root)
    inside_prefix = root + sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    denied = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
              "os.forkpty", "os.system", "os.startfile", "os.kill", "os.killpg",
              "signal.pthread_kill", "ctypes.", "pty.", "_posixsubprocess", "gc.get_",
              "sys._current_frames")
    # event -> indexes of its path arguments (every one must be inside), index of dir_fd args
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
        "os.symlink": ((0, 1), (2,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()),
        "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), ()), "shutil.chown": ((0,), ()),
    }
    fspath = os.fspath
    isdir = os.path.isdir

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True  # an open descriptor: opening it was checked
        try:
            p = fspath(path)
            if isinstance(p, bytes):
                p = os.fsdecode(p)
        except TypeError:
            return False
        p = realpath(p)
        return p == root or p.startswith(inside_prefix)

    def deny(event: str) -> None:
        raise PermissionError(f"sandbox: {event} is not allowed")

    def other_process(path: object) -> bool:
        """A path into /proc/PID of another process (its environment, memory, fds)."""
        try:
            p = realpath(os.fsdecode(fspath(path)))
        except TypeError:
            return False
        if not p.startswith("/proc/"):
            return False
        pid = p.split("/")[2]
        return pid.isdigit() and int(pid) != os.getpid()

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return  # an open descriptor: opening it was checked
            if mode is not None:
                writing = any(c in mode for c in "wax+")
            else:
                writing = bool(flags & write_flags) if isinstance(flags, int) else True
            if writing and not inside(path):
                deny(f"writing {path!r}")
            if other_process(path):
                deny(f"reading {path!r}")
            if mode is None and not inside(path) and isdir(path):
                deny(f"opening the directory {path!r}")  # a dir_fd would escape the path check
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):
                deny(f"{event} with dir_fd")
            for i in paths:
                if i < len(args) and not inside(args[i]):
                    deny(f"{event} {args[i]!r}")
        elif event == "import" and args[0] in ("ctypes", "_ctypes"):
            deny(f"import {args[0]}")
        elif event.startswith(denied):
            deny(event)

    sys.addaudithook(hook)


def _run_program(cfg: dict, source: bytes, flags: dict) -> None:
    """In the process that becomes the program: last steps, then the program itself."""
    import types

    _forget_ctypes()
    report_fd = cfg["report_fd"]
    tmp = cfg["tmp"]
    path = os.path.join(tmp, "program.py")
    sys.dont_write_bytecode = True  # no .pyc caches: the places they go are not writable
    if cfg["audit_hook"]:
        _install_audit_hook(tmp)
        flags["audit_hook"] = True
    try:
        os.write(report_fd, " ".join(f"{k}={int(v)}" for k, v in flags.items()).encode())
    finally:
        os.close(report_fd)
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [path]
    status = 0
    try:
        exec(compile(source, path, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException:
        kind, error, tb = sys.exc_info()
        tb = tb.tb_next if tb is not None else None  # the traceback from the program on
        sys.excepthook(kind, error.with_traceback(tb), tb)
        status = 1
    _fast_exit(status)


def _exit_status(code: object) -> int:
    """The exit status Python gives `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _fast_exit(status: int) -> None:
    """Exit as the interpreter would (wait for threads, atexit, flush) without tearing the
    interpreter down: that teardown costs several ms per program and nobody needs it here."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        status = status or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            status = status or 120  # what Python exits with when the final flush fails
    os._exit(status)


def _exit_like(status: int) -> None:
    """End this process the way a child with wait status `status` ended."""
    if os.WIFSIGNALED(status):
        import signal

        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _parse_config(args: list[str]) -> dict:
    """`key=value` arguments (json costs ~5 ms to import)."""
    cfg: dict = {}
    for arg in args:
        key, _, value = arg.partition("=")
        cfg[key] = value if key in ("tmp", "cgroup") else int(value)
    return cfg


def _boot(args: list[str]) -> tuple[dict, bytes, dict]:
    """Contain this process; in the process that is to run the program, return what
    `_run_program` needs (the others end here)."""
    cfg = _parse_config(args)
    report_fd = cfg["report_fd"]
    flags: dict[str, bool] = {}
    with open(os.path.join(cfg["tmp"], "program.py"), "rb") as f:
        source = f.read()
    linux = sys.platform.startswith("linux")
    namespaced = None
    ctypes = libc = None
    if linux and cfg["namespaces"]:
        try:
            ctypes, libc = _libc()
            namespaced = _boot_namespaces(ctypes, libc, cfg, flags)
            if namespaced:
                _boot_filesystem(ctypes, libc, cfg, source, flags)
        except OSError:
            pass
    if cfg.get("cgroup"):
        flags["processes"] = _in_cgroup(cfg["cgroup"])
    _boot_limits(cfg, flags, namespaced)
    if not namespaced:
        if libc is not None:
            try:
                _drop_capabilities(ctypes, libc, flags)
            except OSError:
                pass
        return cfg, source, flags
    # The next child is PID 1 of the new PID namespace: it mounts that namespace's /proc and
    # reaps; its child runs the program. When PID 1 ends the kernel kills the namespace.
    status_r, status_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(status_r)
        libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
        proc_flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        if libc.mount(b"proc", b"/proc", b"proc", proc_flags, None) == 0:
            flags["private_proc"] = True
        elif libc.mount(b"tmpfs", b"/proc", b"tmpfs", proc_flags | _MS_RDONLY, b"size=0") == 0:
            flags["private_proc"] = True  # hidden instead
        program = os.fork()
        if program == 0:
            os.close(status_w)
            try:
                _drop_capabilities(ctypes, libc, flags)
            except OSError:
                pass
            return cfg, source, flags
        os.close(report_fd)
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                os._exit(1)
            if pid == program:
                os.write(status_w, str(status).encode())
                os._exit(0)
    os.close(status_w)
    os.close(report_fd)
    _, init_status = os.waitpid(init, 0)
    status = os.read(status_r, 64)
    if not status:
        _exit_like(init_status)
    _exit_like(int(status))
    raise AssertionError("unreachable")


def _forget_ctypes() -> None:
    """The bootstrap's ctypes, out of the program's reach: `import ctypes` runs again (and the
    audit hook refuses its dlopen)."""
    if "ctypes" in sys.modules:
        for name in [n for n in sys.modules if n == "_ctypes" or n.split(".")[0] == "ctypes"]:
            del sys.modules[name]


if __name__ == "__main__":
    _run_program(*_boot(sys.argv[1:]))
    sys.exit(0)

# ----------------------------------------------------------------------------------------------
# Parent side.

import functools  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
_BOOTSTRAP = os.path.abspath(__file__)
# Every mechanism `enforced` reports, in README order.
MECHANISMS = (
    "environment", "process_group", "cpu", "memory", "processes", "file_size", "core",
    "open_files", "user_namespace", "pid_namespace", "private_proc", "network",
    "filesystem_read_only", "temp_tmpfs", "capabilities_dropped", "audit_hook",
)


@dataclass(frozen=True)
class SandboxResult:
    """How a contained program ended. `returncode` is negative for a signal (as subprocess);
    `killed_reason` says why the sandbox or a limit ended it ("timeout", "cpu_limit",
    "file_size_limit", "signal SIGKILL", ...), None when it exited by itself."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    enforced: dict[str, bool] = field(default_factory=dict)
    pid: int = 0  # the bootstrap's pid (= the process group id); for tests and diagnostics

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


_run_counter = itertools.count()


@functools.cache
def _pids_cgroup_root() -> str | None:
    """A folder for per-run pids cgroups (cgroup v2 or v1 "pids"), when we may make one: root
    on Linux with a writable cgroup file system. None elsewhere."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for fields in mounts:
        sep = fields.index("-")
        fstype, point, super_opts = fields[sep + 1], fields[4], fields[sep + 3]
        try:
            if fstype == "cgroup" and "pids" in super_opts.split(","):
                parent = os.path.join(point, "fedsdr-sandbox")
                os.makedirs(parent, exist_ok=True)
                return parent
            if fstype == "cgroup2":
                with open(os.path.join(point, "cgroup.controllers")) as f:
                    if "pids" not in f.read().split():
                        continue
                parent = os.path.join(point, "fedsdr-sandbox")
                os.makedirs(parent, exist_ok=True)
                for folder in (point, parent):
                    with open(os.path.join(folder, "cgroup.subtree_control"), "w") as f:
                        f.write("+pids")
                return parent
        except OSError:
            continue
    return None


def _make_cgroup(max_tasks: int) -> str | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = os.path.join(root, f"run-{os.getpid()}-{next(_run_counter)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_tasks))
        return path
    except OSError:
        _remove_cgroup(path)
        return None


def _join_cgroup(path: str, pid: int) -> None:
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    except OSError:
        pass  # the bootstrap tries again itself, and reports


def _remove_cgroup(path: str) -> None:
    """Kill whatever is left in the cgroup (it holds processes that left the process group
    too) and remove it."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            return  # left behind, empty or not: rmdir by hand (fedsdr-sandbox/run-*)
        time.sleep(0.002)


def _minimal_env(tmp: str) -> dict[str, str]:
    return {
        "PATH": ENV_PATH, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
        # Thread pools and malloc arenas reserve address space: one of each under RLIMIT_AS.
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the bootstrap to end without reaping it (so its pid, the process group id,
    stays ours until the group is killed). True when it ended in time."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(proc.pid)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return bool(poller.poll(max(0.0, timeout) * 1000))
            finally:
                os.close(fd)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, limit: float = 2.0) -> None:
    """SIGKILL is asynchronous: give the killed group a moment to be gone (zombies whose
    parent does not reap them can keep it, hence the limit)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.001)


def _read_capped(f, limit: int) -> str:  # noqa: ANN001
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _killed_reason(returncode: int | None, timed_out: bool) -> str | None:
    if timed_out:
        return "timeout"
    if returncode is None or returncode >= 0:
        return None
    sig = -returncode
    if sig == signal.SIGXCPU:
        return "cpu_limit"
    if sig == signal.SIGXFSZ:
        return "file_size_limit"
    try:
        return f"signal {signal.Signals(sig).name}"
    except ValueError:
        return f"signal {sig}"


def _parse_report(fd: int) -> dict[str, bool]:
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    report = {}
    for item in b"".join(chunks).decode(errors="replace").split():
        key, _, value = item.partition("=")
        report[key] = value == "1"
    return report


def run_python(
    source: str,
    *,
    timeout: float,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: int = 16,
    max_temp_mb: int = 64,
    max_open_files: int = 64,
    max_output_bytes: int = 1 << 20,
    namespaces: bool = True,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run `source` as a Python program, contained (see the module docstring), for at most
    `timeout` wall-clock seconds (CPU time: the timeout rounded up + 2 s).

    `memory_mb` caps the address space of each process, `max_processes` the processes and
    threads the program may run (itself included), `max_file_mb` any one file it writes (its
    stdout and stderr too), `max_temp_mb` its temp folder (a tmpfs where mounts are possible),
    `max_open_files` its descriptors; `max_output_bytes` of stdout and of stderr come back.
    `namespaces` and `audit_hook` switch those layers off (tests use that to show what the
    other layers hold alone). Thread-safe; the per-program overhead is a few tens of ms."""
    if os.name != "posix":
        return _run_unconfined(source, timeout, max_output_bytes)
    tmp = tempfile.mkdtemp(prefix="fedsdr-sbx-")
    report_r, report_w = os.pipe()
    cgroup = _make_cgroup(int(max_processes) + 2)
    try:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        cfg = {
            "tmp": tmp, "timeout": math.ceil(timeout), "memory_mb": int(memory_mb),
            "max_processes": int(max_processes), "max_file_mb": int(max_file_mb),
            "max_temp_mb": int(max_temp_mb), "max_open_files": int(max_open_files),
            "report_fd": report_w, "namespaces": int(namespaces), "audit_hook": int(audit_hook),
        }
        if cgroup:
            cfg["cgroup"] = cgroup
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", _BOOTSTRAP, *(f"{k}={v}" for k, v in cfg.items())],
                cwd=tmp, env=_minimal_env(tmp), stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, pass_fds=(report_w,), start_new_session=True,
            )
            os.close(report_w)
            report_w = -1
            if cgroup:
                _join_cgroup(cgroup, proc.pid)
            try:
                finished = _wait(proc, timeout)
            finally:
                _kill_group(proc.pid)  # the program's leftovers too, also after a clean exit
                proc.wait()
                _wait_group_gone(proc.pid)
            returncode = None if not finished else proc.returncode
            enforced = dict.fromkeys(MECHANISMS, False)
            enforced.update(_parse_report(report_r))
            enforced["environment"] = enforced["process_group"] = True
            return SandboxResult(
                returncode=returncode,
                stdout=_read_capped(out, max_output_bytes),
                stderr=_read_capped(err, max_output_bytes),
                timed_out=not finished,
                killed_reason=_killed_reason(returncode, not finished),
                enforced=enforced,
                pid=proc.pid,
            )
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
        if cgroup:
            _remove_cgroup(cgroup)
        _remove_tree(tmp)


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, p, _exc):  # noqa: ANN001, ANN202
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _run_unconfined(source: str, timeout: float, max_output_bytes: int) -> SandboxResult:
    """Non-POSIX systems: a timeout and an emptied environment only."""
    with tempfile.TemporaryDirectory(prefix="fedsdr-sbx-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"SYSTEMROOT": os.environ.get("SYSTEMROOT", ""), "TEMP": tmp, "TMP": tmp}
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=tmp, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return SandboxResult(None, "", "", True, "timeout", {"environment": True})
        return SandboxResult(
            done.returncode,
            done.stdout[:max_output_bytes].decode("utf-8", errors="replace"),
            done.stderr[:max_output_bytes].decode("utf-8", errors="replace"),
            False, None, {"environment": True},
        )
