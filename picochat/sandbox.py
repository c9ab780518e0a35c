"""Run model-written Python (the chat engine's calculator, code evaluation) in a contained child process.

Unlike nanochat's execution helper, which is explicitly not a security boundary, this one is meant to
be one on Linux. run_python starts a fresh interpreter in isolated mode without site-packages (stdlib
only: `import picochat` fails), in an empty temporary directory that is removed afterwards, with a
fixed environment (nothing inherited), stdin at /dev/null and its own session. Before the user code
runs, a prelude inside that child makes irreversible changes to itself (in the child, not in a
preexec_fn, which is unsafe in a threaded parent such as a web server):

  netns           a new network namespace, which has only a loopback that is down (directly as root;
                  else inside a new user namespace)
  rlimits         address space, CPU seconds, file size, open files, no core dumps; and, inside a new
                  user namespace, a few tasks (the kernel never applies RLIMIT_NPROC to root, and for
                  another user it counts every process that user has, so it is only set where the
                  count starts from this child)
  no-caps         every capability dropped, so a child running as root can neither raise its limits
                  again nor use root's privileges (raw devices, kernel modules, other users' files)
  landlock-fs     read and execute beneath Python's own installation and /usr, /lib, /lib64 only;
                  everything beneath the temporary directory except creating device nodes; /dev/null
  landlock-net    no TCP bind or connect (Landlock ABI >= 4)
  landlock-scope  no signals or abstract unix sockets to processes outside (Landlock ABI >= 6)
  seccomp         (x86_64, aarch64) no new processes or programs (fork, non-thread clone, execve), no
                  sockets at all (so no asyncio event loop either), no ptrace or other access to
                  other processes' memory, limits, scheduling or signals, no namespaces or mounts, no
                  io_uring, memfd or kernel keyrings, and no changes to file modes, owners, times,
                  extended attributes or flags, which Landlock does not cover

Threads work; their number is bounded by the address space (and by RLIMIT_NPROC where it is set).

`protections` in the result names the layers the child applied; where the kernel lacks one (older
kernels, no Landlock, another architecture) it is missing from the list and the others still apply.
Outside Linux only the rlimits, the timeout, the temporary directory and the environment apply.

What this protects against: escape to the host filesystem beyond read access to Python's
installation (including a virtualenv's site-packages, which code could put on sys.path) and the
system libraries; writes, deletions and metadata changes outside the temporary directory; network
access; new processes; signals to and tampering with other processes; exhausting memory, CPU time,
wall time, output or file size; reading secrets from the parent's environment.

What it does not protect against: kernel exploits (the whole system call surface that is left);
side channels; reading world-readable files under /usr and /lib, or the existence, size and times
of any file (stat is not restricted); the disk space of the temporary directory (each file is
capped, the number of files only by the timeout); CPU contention with the host while the code runs;
on platforms and kernels where a layer is missing, what that layer would have stopped (without
seccomp, for instance, a fork bomb run as root meets no limit but the timeout, and children that
leave the process group survive it).
"""

import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache

from picochat.common import PicochatError

# The child's own code: it reads the user code, applies every protection it can, reports them on
# the pipe whose fd it was given, then runs the code as __main__. It gets nothing from us but argv
# (workdir, report fd, memory bytes, CPU seconds, file bytes), so it can run under `python -I -S`.
PRELUDE = r'''
import ctypes, os, resource, sys

workdir = sys.argv[1]
report_fd, memory_bytes, cpu_seconds, file_bytes = map(int, sys.argv[2:6])
with open("main.py", encoding="utf-8") as f:
    code = f.read()
os.unlink("main.py")

NPROC = 16  # this process and its threads, when RLIMIT_NPROC counts only them (a new user namespace)
NOFILE = 64
CLONE_THREAD, CLONE_NEWUSER, CLONE_NEWNET = 0x10000, 0x10000000, 0x40000000
EPERM, ENOSYS = 1, 38

linux = sys.platform == "linux"
if linux:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long


def check(result):
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def syscall(number, *args):
    # variadic: ints must travel as full-width longs, or the kernel sees garbage in the upper halves
    return libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def prctl(*args):
    args += (0,) * (5 - len(args))
    return check(libc.prctl(*(ctypes.c_ulong(a) for a in args)))


def new_network_namespace():
    """Whether the new network namespace needed a new user namespace; None if neither worked."""
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):  # root can; others need a user namespace
        if libc.unshare(flags) == 0:
            return flags & CLONE_NEWUSER != 0
    return None


def set_rlimits(in_user_namespace):
    limits = {resource.RLIMIT_AS: (memory_bytes, memory_bytes),
              # soft < hard, so the soft limit sends SIGXCPU, telling a CPU kill apart from the OOM killer's
              resource.RLIMIT_CPU: (cpu_seconds, cpu_seconds + 1),
              resource.RLIMIT_FSIZE: (file_bytes, file_bytes),
              resource.RLIMIT_NOFILE: (NOFILE, NOFILE),
              resource.RLIMIT_CORE: (0, 0)}
    if in_user_namespace:
        limits[resource.RLIMIT_NPROC] = (NPROC, NPROC)
    applied = True
    for which, (soft, hard) in limits.items():
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:  # we may only lower a hard limit
            soft, hard = min(soft, current), min(hard, current)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            applied = False
    return applied


def drop_capabilities():
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    check(libc.capset(header, (ctypes.c_uint32 * 6)()))  # effective, permitted, inheritable: all empty


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
MAKE_CHAR, MAKE_BLOCK, REFER, TRUNCATE, IOCTL_DEV = 1 << 6, 1 << 11, 1 << 13, 1 << 14, 1 << 15


def landlock():
    abi = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return []
    handled = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    for version, right in ((2, REFER), (3, TRUNCATE), (5, IOCTL_DEV)):
        if abi >= version:
            handled |= right
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, and no rule allows any port
    scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = (ctypes.c_uint64 * 3)(handled, net, scoped)
    ruleset = check(syscall(444, attr, 8 * (1 + (abi >= 4) + (abi >= 6)), 0))  # the struct grew with the ABI
    try:
        def allow(path, access):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                check(syscall(445, ruleset, 1, ctypes.byref(PathBeneath(access, fd)), 0))  # PATH_BENEATH
            finally:
                os.close(fd)

        python = {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix,
                  os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
        for path in sorted(python | {"/usr", "/lib", "/lib64"}):
            if os.path.isdir(path):
                allow(path, EXECUTE | READ_FILE | READ_DIR)
        # as root, a device node of its own would open the raw disk or memory
        allow(workdir, handled & ~(MAKE_CHAR | MAKE_BLOCK))
        allow(os.devnull, handled & (EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV))
        check(syscall(446, ruleset, 0))  # landlock_restrict_self
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + ["landlock-net"] * (abi >= 4) + ["landlock-scope"] * (abi >= 6)


# Syscall numbers; those from 424 on are the same on every architecture.
SYSCALLS = {
    "x86_64": (0xC000003E, dict(
        ioctl=16, socket=41, socketpair=53, clone=56, fork=57, vfork=58, execve=59, kill=62, fcntl=72,
        truncate=76, chmod=90, fchmod=91, chown=92, fchown=93, lchown=94, ptrace=101, rt_sigqueueinfo=129,
        utime=132, setpriority=141, sched_setparam=142, sched_setscheduler=144, mount=165, setxattr=188,
        lsetxattr=189, fsetxattr=190, removexattr=197, lremovexattr=198, fremovexattr=199, tkill=200,
        sched_setaffinity=203, tgkill=234, utimes=235, add_key=248, request_key=249, keyctl=250, ioprio_set=251,
        migrate_pages=256, fchownat=260, futimesat=261, fchmodat=268, unshare=272, move_pages=279,
        utimensat=280, rt_tgsigqueueinfo=297, prlimit64=302, setns=308, process_vm_readv=310,
        process_vm_writev=311, kcmp=312, sched_setattr=314, memfd_create=319, execveat=322)),
    "aarch64": (0xC00000B7, dict(
        setxattr=5, lsetxattr=6, fsetxattr=7, removexattr=14, lremovexattr=15, fremovexattr=16, fcntl=25,
        ioctl=29, ioprio_set=30, mount=40, truncate=45, fchmod=52, fchmodat=53, fchownat=54, fchown=55,
        utimensat=88, unshare=97, ptrace=117, sched_setparam=118, sched_setscheduler=119, sched_setaffinity=122,
        kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138, setpriority=140, socket=198, socketpair=199,
        add_key=217, request_key=218, keyctl=219, clone=220, execve=221, migrate_pages=238, move_pages=239,
        rt_tgsigqueueinfo=240, prlimit64=261, setns=268, process_vm_readv=270, process_vm_writev=271,
        kcmp=272, sched_setattr=274, memfd_create=279, execveat=281)),
}
GENERIC = dict(pidfd_send_signal=424, io_uring_setup=425, pidfd_open=434, clone3=435, pidfd_getfd=438,
               process_madvise=440, fchmodat2=452, setxattrat=463, removexattrat=466, file_setattr=469)

LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
ALLOW, KILL, ERRNO = (RET, 0, 0, 0x7FFF0000), (RET, 0, 0, 0x80000000), 0x00050000
DENY = (RET, 0, 0, ERRNO | EPERM)
ARG0, ARG1 = 16, 24  # low halves of seccomp_data.args[0], args[1] (both architectures are little-endian)


def allow_if_any(offset, values):
    """Allow when the argument equals one of values, else EPERM."""
    n = len(values)
    return [(LD, 0, 0, offset), *[(JEQ, n - i, 0, v) for i, v in enumerate(values)], DENY, ALLOW]


def deny_if_any(offset, values):
    n = len(values)
    return [(LD, 0, 0, offset), *[(JEQ, n - i, 0, v) for i, v in enumerate(values)], ALLOW, DENY]


def seccomp_policy(pid):
    """(syscall, instructions run when it is called; each block ends in a return)."""
    deny = ["fork", "vfork", "execve", "execveat",  # no new processes or programs
            "socket", "socketpair", "io_uring_setup",  # io_uring could make sockets behind the filter's back
            # other processes of the same user are fair game without any capability
            "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_open",
            "pidfd_getfd", "pidfd_send_signal", "setpriority", "ioprio_set",
            "unshare", "setns", "mount",  # a user namespace would hand back capabilities
            "memfd_create",  # memory outside RLIMIT_AS
            "add_key", "request_key", "keyctl",  # the session and user keyrings we inherit
            # Landlock does not cover metadata, nor truncate by path before ABI 3
            "truncate", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
            "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "setxattrat",
            "removexattr", "lremovexattr", "fremovexattr", "removexattrat", "file_setattr"]
    own = allow_if_any(ARG0, [pid])
    own_or_self = allow_if_any(ARG0, [0, pid])
    return [(name, [DENY]) for name in deny] + [
        ("clone3", [(RET, 0, 0, ERRNO | ENOSYS)]),  # so glibc falls back to clone, whose flags we can see
        ("clone", [(LD, 0, 0, ARG0), (JSET, 1, 0, CLONE_THREAD), DENY, ALLOW]),  # threads only
        # F_SETOWN, F_SETOWN_EX, FIOSETOWN, SIOCSPGRP would aim SIGIO (any signal) at another process;
        # FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR change a file's flags through a read-only descriptor
        ("fcntl", deny_if_any(ARG1, [8, 15])),
        ("ioctl", deny_if_any(ARG1, [0x8901, 0x8902, 0x40086602, 0x401C5820])),
        *[(name, own) for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")],
        *[(name, own_or_self) for name in ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam",
                                           "sched_setattr", "migrate_pages", "move_pages")]]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def seccomp():
    machine = os.uname().machine
    if machine not in SYSCALLS or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    audit_arch, numbers = SYSCALLS[machine]
    numbers = {**numbers, **GENERIC}
    program = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), KILL, (LD, 0, 0, 0)]  # arch, then nr
    if machine == "x86_64":
        program += [(JGE, 0, 1, 0x40000000), KILL]  # x32 numbers reach the same kernel by other names
    for name, block in seccomp_policy(os.getpid()):
        if name in numbers:
            program += [(JEQ, 0, len(block), numbers[name]), *block]
    program.append(ALLOW)
    fprog = SockFprog(len(program), (SockFilter * len(program))(*program))
    try:
        # the prelude is single-threaded, so the filter covering this thread covers every later one
        prctl(22, 2, ctypes.addressof(fprog))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    except OSError:  # EINVAL: a kernel built without seccomp filters
        return False
    return True


layers = []
in_user_namespace = new_network_namespace() if linux else None
if in_user_namespace is not None:
    layers.append("netns")
if set_rlimits(bool(in_user_namespace)):
    layers.append("rlimits")
if linux:
    prctl(4, 0)  # PR_SET_DUMPABLE: no core dump even through a core_pattern pipe; others can't ptrace us
    drop_capabilities()
    layers.append("no-caps")
    prctl(38, 1)  # PR_SET_NO_NEW_PRIVS, which Landlock and seccomp require of an unprivileged process
    layers += landlock()
    if seccomp():
        layers.append("seccomp")
os.write(report_fd, ",".join(layers).encode())
os.close(report_fd)


def excepthook(kind, value, tb):
    # the user's source lines, without this prelude's frame; imported only now, since linecache alone
    # costs a third of a trivial run
    import linecache, traceback
    linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")
    traceback.print_exception(kind, value, tb.tb_next if tb else None)


sys.excepthook = excepthook
sys.argv = ["<sandbox>"]
main = type(sys)("__main__")  # a fresh __main__, so pickle and typing find the user's globals
sys.modules["__main__"] = main
exec(compile(code, "<sandbox>", "exec"), main.__dict__)
'''


@dataclass
class SandboxResult:
    success: bool  # exited 0, no timeout, no limit hit
    stdout: str  # at most max_output_bytes of it, decoded as utf-8 with errors replaced
    stderr: str  # likewise
    returncode: int | None  # negative: the signal that ended it
    timeout: bool  # the wall-clock limit passed and we killed it
    memory_exceeded: bool  # MemoryError in stderr, or a SIGKILL we did not send: the OOM killer's (or the
    #                        CPU hard limit's, one second after a SIGXCPU that the code ignored)
    killed: bool  # ended by a signal: ours, or the kernel's (SIGXCPU for the CPU limit, SIGKILL)
    output_truncated: bool  # stdout or stderr passed max_output_bytes, and we killed it then
    error: str  # the last non-empty line of stderr, "" if none
    protections: tuple[str, ...]  # the layers the child applied (see the module docstring)


def run_python(code: str, timeout: float = 5.0, memory_bytes: int = 256 << 20, cpu_seconds: int | None = None,
               max_output_bytes: int = 1 << 20, max_file_bytes: int = 16 << 20) -> SandboxResult:
    """Run `code` as __main__ in a fresh sandboxed interpreter and report how it ended.

    timeout: wall-clock seconds, from start-up to exit. memory_bytes: its address space (RLIMIT_AS).
    cpu_seconds: CPU time over all its threads (default ceil(timeout) + 1). max_output_bytes: kept of
    stdout and of stderr each; it is killed as soon as either passes it. max_file_bytes: the largest
    file it may write in its temporary directory (larger writes fail with EFBIG).

    Nothing the code does raises here: failures, kills and limits are in the result. PicochatError
    means a problem on our side, such as an interpreter that cannot be started.
    """
    if cpu_seconds is None:
        cpu_seconds = math.ceil(timeout) + 1
    if min(timeout, memory_bytes, cpu_seconds, max_output_bytes, max_file_bytes) <= 0:
        raise PicochatError("sandbox limits must be positive")
    try:
        workdir = tempfile.mkdtemp(prefix="picochat-sandbox-")
    except OSError as e:
        raise PicochatError(f"cannot create a sandbox directory: {e}") from e
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        limits = [str(int(memory_bytes)), str(math.ceil(cpu_seconds)), str(int(max_file_bytes))]
        return _run(workdir, time.monotonic() + timeout, limits, max_output_bytes)
    finally:
        _remove_tree(workdir)


def _run(workdir: str, deadline: float, limits: list[str], max_output_bytes: int) -> SandboxResult:
    report_r, report_w = os.pipe()
    argv = [sys.executable, "-I", "-S", "-X", "utf8", "-c", PRELUDE, workdir, str(report_w), *limits]
    # one malloc arena: glibc reserves 64 MiB of address space for each thread's own, which would
    # let RLIMIT_AS admit only a handful of threads
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir, "MALLOC_ARENA_MAX": "1"}
    try:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(report_w,), start_new_session=True)
    except OSError as e:
        os.close(report_r)
        raise PicochatError(f"cannot start the sandbox interpreter {sys.executable!r}: {e}") from e
    finally:
        os.close(report_w)
    with proc, os.fdopen(report_r, "rb") as report:
        try:
            out, err, ending = _collect(proc, deadline, max_output_bytes)
            if ending is None:  # it closed its output; give it the rest of the time to exit
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    ending = "timeout"
        finally:
            _kill_group(proc.pid)  # after a timeout, or whatever of the group outlived it
            proc.wait()
        protections = tuple(p for p in report.read().decode().split(",") if p)  # it closed its end long ago
    stdout = out[:max_output_bytes].decode("utf-8", errors="replace")
    stderr = err[:max_output_bytes].decode("utf-8", errors="replace")
    timeout, truncated = ending == "timeout", ending == "truncated"
    memory = "MemoryError" in stderr or (proc.returncode == -signal.SIGKILL and ending is None)
    killed = proc.returncode < 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    return SandboxResult(success=proc.returncode == 0 and not (timeout or truncated or memory or killed),
                         stdout=stdout, stderr=stderr, returncode=proc.returncode, timeout=timeout,
                         memory_exceeded=memory, killed=killed, output_truncated=truncated,
                         error=lines[-1].strip() if lines else "", protections=protections)


def _collect(proc: subprocess.Popen, deadline: float, max_output_bytes: int):
    """Read stdout and stderr until both close: (out, err, None), or until the deadline ('timeout')
    or until either passes the cap ('truncated'), having killed the process group then."""
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(proc.pid)
                return *buffers.values(), "timeout"
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffers[key.fd] += chunk
                if len(buffers[key.fd]) > max_output_bytes:
                    _kill_group(proc.pid)
                    return *buffers.values(), "truncated"
    return *buffers.values(), None


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_tree(top: str):
    """Remove the sandbox directory whatever the code left there: a tree too deep for recursion or for
    path lengths (each subdirectory is first moved up to the top), directories we may not list or
    enter (mkdir takes a mode, no chmod needed; we own them), symlinks (never followed)."""
    stack, moved = [top], 0
    while stack:
        directory = stack[-1]
        os.chmod(directory, 0o700)
        with os.scandir(directory) as it:
            entries = list(it)
        subdirs = [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
        for entry in subdirs:
            target = entry.path
            if directory != top:
                while os.path.lexists(target):
                    moved += 1
                    target = os.path.join(top, f".removing-{moved}")
                os.rename(entry.path, target)
            stack.append(target)
        if not subdirs:
            for entry in entries:
                os.unlink(entry.path)
            os.rmdir(directory)
            stack.pop()


@cache
def protections_available() -> tuple[str, ...]:
    """The layers a sandboxed run gets on this machine (one trivial run, remembered)."""
    return run_python("pass").protections
