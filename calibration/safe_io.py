"""The one way LiteFFN writes a file (compressed files, statistics): nothing a careless user
does, and no signal, loses data or leaves litter.

- check_output(): refuses, before any work, an output that is one of the inputs (also through
  a symlink or a hard link: st_dev/st_ino and realpath), a directory, something that is not a
  regular file (a device node, a FIFO, a socket), an existing file of another kind (a model
  checkpoint, a statistics file where a compressed file goes), and an output whose expected
  size does not fit the free space of its disk. Each refusal is one OutputError (a ValueError)
  naming the path and what to do.
- SafeOutput: the data goes straight into a temporary file beside the output, created
  exclusively (O_CREAT | O_EXCL | O_NOFOLLOW: a file or link planted at its name is never
  followed or reused), named `.<name>.liteffn-tmp-<host>-<pid>-<random>`; when the `with` block
  ends cleanly it is flushed, synced and renamed onto the output (os.replace: one rename, no
  second copy, the old output stays whole until then). Any exception removes it, and so do
  SIGTERM and SIGHUP while it is open: handlers are installed for the duration (main thread
  only; signals that were ignored stay ignored) and restored after; a signal whose action was
  the default then ends the process with SystemExit(128 + signal), so outer cleanup still runs.
- clean_stale(): a temp whose writer is gone (SIGKILL, power loss) is removed by the next
  write into that directory: same host, process id not alive, and (where fcntl exists) not
  locked (the writer holds an flock on it, which also covers process-id namespaces).

Standard library only; no ComfyUI.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import signal
import socket
import stat
import struct
import threading

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temps are judged by host and process id
    fcntl = None

TMP_TAG = ".liteffn-tmp-"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
# .<name>.liteffn-tmp-<host>-<pid>-<hex>; and the names of earlier versions' writers
_TMP_RE = re.compile(r"^\..+\.liteffn-tmp-(?P<host>[A-Za-z0-9-]*)-(?P<pid>\d+)-[0-9a-f]+$")
_OLD_TMP_RE = re.compile(r"^\..+\.safetensors\.(?P<pid>\d+)(\.data)?\.tmp$")


class OutputError(ValueError):
    """An output refused before any work (or a write that could not finish); the message
    names the path and the fix."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]


def temp_path(directory: str, base: str) -> str:
    """A scratch name in directory, beside the output named base, that clean_stale recognises as this
    process's (and removes once the process is gone, unless the file is locked)."""
    return os.path.join(directory, f".{base}{TMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def lock_exclusive(fd: int) -> None:
    """An exclusive flock on fd where there are flocks: another process's clean_stale leaves the file
    alone while this descriptor is open."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or os.path.realpath(a) == os.path.realpath(b)


def file_kind(path: str) -> str | None:
    """The LiteFFN format stored in a safetensors file's metadata ('liteffn.compressed',
    'liteffn.stats'), '' for another safetensors file, None for something that is not one.
    Reads the header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        raw = (header.get("__metadata__") or {}).get("liteffn")
        return json.loads(raw).get("format", "") if raw else ""
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None


_KIND_NAMES = {"liteffn.compressed": "a LiteFFN compressed file", "liteffn.stats": "a LiteFFN statistics file",
               "": "a safetensors file that is not LiteFFN's (a model checkpoint?)",
               None: "a file that is not a safetensors file"}


def check_free_space(path: str, need: int) -> None:
    """OutputError when the disk of path's directory has less than need bytes (plus 1%) free."""
    d = os.path.dirname(os.path.abspath(path))
    while d and not os.path.isdir(d):  # the first existing ancestor: the one that will hold it
        d = os.path.dirname(d)
    try:
        st = os.statvfs(d)
    except (AttributeError, OSError):  # no statvfs (Windows) or not answerable: the write will tell
        return
    free = st.f_bavail * st.f_frsize
    if need + need // 100 > free:
        raise OutputError(
            f"not enough free space for {path}: it needs about {_gib(need)}, {d} has {_gib(free)} free. "
            "Free some space there or write the output to another disk."
        )


def check_output(path: str, inputs=(), *, expect_format: str | None = None, expected_bytes: int | None = None,
                 option: str = "output") -> str:
    """Validate an output before any work; returns the path to write (a symlink's target).

    inputs: the files this run reads (None entries ignored); expect_format: the LiteFFN format
    the output will hold: an existing file of another kind is not overwritten; expected_bytes:
    the output's size where it can be known. option: how the user names the output, for the
    messages ("-o", "save_name", ...)."""
    if not path or not str(path).strip():
        raise OutputError(f"no {option} file given")
    path = os.fspath(path)
    fix = f"give {option} another file name"
    if os.path.isdir(path):
        raise OutputError(f"{option} {path} is a directory; {fix}, e.g. "
                          f"{os.path.join(path, 'model-liteffn.safetensors')}")
    if path.endswith(("/", os.sep)):
        raise OutputError(f"{option} {path} names a directory; {fix} (a file in it)")
    if os.path.islink(path) and not os.path.exists(path):
        raise OutputError(f"{option} {path} is a symbolic link to a missing file ({os.path.realpath(path)}); "
                          f"remove the link or {fix}")
    for src in inputs:
        if src and os.path.exists(src) and _same_file(path, src):
            raise OutputError(f"{option} {path} is the input {src}: writing it would destroy the input; {fix}")
    if os.path.exists(path):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{option} {path} exists and is not a regular file (a device, FIFO or socket); {fix}")
        if expect_format is not None and st.st_size > 0:
            kind = file_kind(path)
            if kind != expect_format:
                raise OutputError(
                    f"{option} {path} exists and is {_KIND_NAMES.get(kind, repr(kind))}, not "
                    f"{_KIND_NAMES.get(expect_format, expect_format)}: writing would destroy it; {fix} "
                    "(or delete that file first if it is really not needed)"
                )
    real = os.path.realpath(path)
    d = os.path.dirname(real)
    if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: the directory {d} is not writable; {fix} (in another directory)")
    if expected_bytes is not None:
        check_free_space(real, expected_bytes)
    return real


# ------------------------------------------------------------------ stale temps
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # nonsense: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, another user's (or not answerable): leave it alone
    return True


def _unlocked(p: str) -> bool:
    """True when no process holds the writer's lock on p (or locks do not exist here)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(p, os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_stale(directory: str) -> list[str]:
    """Remove temps of LiteFFN writers in directory that are gone (killed, crashed); returns
    what was removed. Only regular files of this user, from this host, whose process is gone."""
    removed = []
    host = _host()
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for n in names:
        m = _TMP_RE.match(n)
        if m is not None:
            if m["host"] != host:
                continue
        else:
            m = _OLD_TMP_RE.match(n)
            if m is None:
                continue
        p = os.path.join(directory, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
            continue
        if _pid_alive(int(m["pid"])) or not _unlocked(p):
            continue
        try:
            os.unlink(p)
            removed.append(p)
        except OSError:
            pass
    return removed


# ------------------------------------------------------------------ signals
_active: dict[str, "SafeOutput"] = {}  # temp path -> its writer, while open
_saved: dict[int, object] = {}  # signal -> the handler ours replaced
_sig_lock = threading.RLock()


class SignalExit(SystemExit):
    """SIGTERM / SIGHUP arrived while a temp was open (their action was the default: end the
    process); the temps are gone, and this unwinds the stack with exit status 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _remove_temps() -> None:
    for p in list(_active):
        try:
            os.unlink(p)
        except OSError:
            pass


def _on_signal(signum, frame):
    old = _saved.get(signum, signal.SIG_DFL)
    if callable(old):  # someone else's handler decides; if it raises, the with blocks clean up
        old(signum, frame)
        return
    _remove_temps()  # first: whatever happens next, nothing is left
    raise SignalExit(signum)


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (ComfyUI runs nodes in a worker thread)
    for s in _SIGNALS:
        if s in _saved:
            continue
        old = signal.getsignal(s)
        if old in (signal.SIG_IGN, None):  # ignored (nohup) stays ignored; None: not set from Python
            continue
        try:
            signal.signal(s, _on_signal)
        except (ValueError, OSError):
            continue
        _saved[s] = old


def _restore() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for s, old in list(_saved.items()):
        try:
            signal.signal(s, old)
        except (ValueError, OSError, TypeError):
            pass
        del _saved[s]


# ------------------------------------------------------------------ the writer
class SafeOutput:
    """with SafeOutput(path, ...) as out: out.file.write(...)  -- path appears, whole, when the
    block ends without an error; otherwise it stays as it was and no temp is left.

    out.file is a binary file opened for reading and writing (seek allowed), positioned at 0.
    Arguments as check_output's. abort() drops the temp early; commit() ends it early."""

    def __init__(self, path: str, inputs=(), *, expect_format: str | None = None,
                 expected_bytes: int | None = None, option: str = "output"):
        self.path = check_output(path, inputs, expect_format=expect_format, expected_bytes=expected_bytes,
                                 option=option)
        self.shown = os.fspath(path)
        self.file = None
        self.tmp = None
        self.done = False
        d = os.path.dirname(self.path)
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the directory of {self.shown}: {e.strerror}; give an output "
                              "elsewhere") from None
        clean_stale(d)
        self._open(d)

    def _open(self, d: str) -> None:
        base = os.path.basename(self.path)[:150]
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY | _O_CLOEXEC
        with _sig_lock:
            for _ in range(100):
                tmp = temp_path(d, base)
                try:
                    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
                except FileExistsError:  # taken, or planted: never followed, never reused
                    continue
                except OSError as e:
                    raise OutputError(f"cannot write {self.shown}: {e.strerror} ({d}); give an output "
                                      "elsewhere") from None
                break
            else:
                raise OutputError(f"cannot create a temporary file beside {self.shown}")
            self.tmp = tmp
            _active[tmp] = self
            if len(_active) == 1:
                _install()
        lock_exclusive(fd)
        self.file = os.fdopen(fd, "w+b")

    def __enter__(self) -> "SafeOutput":
        return self

    def __exit__(self, exc_type, exc, _tb):
        if exc_type is None and not self.done:
            self.commit()
            return False
        self.abort()
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            raise enospc_message(self.shown, exc) from exc
        return False

    def commit(self) -> None:
        """Flush, sync and rename the temp onto the output."""
        if self.done:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            if hasattr(os, "fchmod"):
                try:  # an output that existed keeps its permissions
                    os.fchmod(self.file.fileno(), stat.S_IMODE(os.stat(self.path).st_mode))
                except OSError:
                    pass
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            if e.errno in FULL_ERRNOS:
                raise enospc_message(self.shown, e) from e
            raise
        except BaseException:
            self.abort()
            raise
        self._forget()

    def abort(self) -> None:
        """Remove the temp; the output is left as it was."""
        if self.done:
            return
        try:
            if self.file is not None and not self.file.closed:
                self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
        self._forget()

    def _forget(self) -> None:
        self.done = True
        with _sig_lock:
            _active.pop(self.tmp, None)
            if not _active:
                _restore()


def enospc_message(path: str, e: OSError) -> OutputError:
    """The one-line error for a write that ran out of space mid-way."""
    return OutputError(f"the disk of {path} became full while writing ({e.strerror}); nothing was written (the "
                       "old file, if any, is as it was). Free some space or write elsewhere.")
