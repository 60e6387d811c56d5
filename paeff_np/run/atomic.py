"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

Readers see the old file or the new one, never half of one, and a write that
fails leaves the old file as it was. Every file the project writes goes
through ``write_atomically``.

A process killed mid-write cannot delete its temporary file, so the temporary
names say who wrote them: ``.<name>.<host>-<pid>.<random>.partial``.
``remove_stale_temporaries(folder)`` deletes those whose writer (same host)
is no longer running; ``train.py`` and ``eval.py`` call it at their start for
the run folder and the data cache. A live writer's file is never touched.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import time

TEMPORARY_SUFFIX = ".partial"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+" + re.escape(TEMPORARY_SUFFIX) + "$")


def write_atomically(path, write, mode="wb"):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it
    over ``path``: readers see the old file or the new one, never half of one.

    An OSError names ``path`` (a full disk says only ``[Errno 28]`` otherwise).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{_HOST}-{os.getpid()}.",
                                   suffix=TEMPORARY_SUFFIX, dir=folder)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
        _fsync_folder(folder)                # the rename itself survives a power cut
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            exc.filename, exc.filename2 = path, None
        raise


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                          # not every system opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1) + "\n"), mode="w")


def remove_stale_temporaries(folder):
    """Delete the temporary files in ``folder`` left by writers of this host that
    are no longer running (killed mid-write); return their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:                          # no folder yet: nothing to clean
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None or match["host"] != _HOST or _is_running(int(match["pid"])):
            continue
        path = os.path.join(folder, name)
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _is_running(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)                      # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:                  # someone else's live process
        return True
    return True


# --- one writer per run folder ---------------------------------------------------------

LOCK_NAME = ".paeff.lock"
_HOLDER_READS = 20           # tries at reading a holder's pid, 10 ms apart (it writes it after locking)


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder):
    """Hold ``folder/.paeff.lock`` while this process writes the run in ``folder``, so
    that a second ``train.py`` into it is refused instead of interleaving its saves
    with the first one's. The folder is created if missing and removed again, when
    empty, on the way out.

    The lock is the operating system's (``flock``, exclusive, on the open file), so
    exactly one process holds it, and a holder killed with ``kill -9`` holds nothing:
    its file is simply locked again. The file's text (``<host>-<pid>``) only names
    the holder in the refusal. Its path is removed while still locked; a process that
    locked the removed file meanwhile sees that the path no longer leads to its file
    and tries again (``_take_lock``).
    """
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = _take_lock(path, folder)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)                         # releases the lock
        if created:
            try:
                os.rmdir(folder)             # only when empty: a refused start leaves nothing
            except OSError:
                pass


def _take_lock(path, folder):
    """Lock ``path`` (created if missing) and write this process into it; return its fd."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUse(_in_use_message(folder, holder)) from None
        except OSError as exc:               # a file system without locks
            os.close(fd)
            raise FolderInUse(f"{folder}: cannot lock {path} ({exc.strerror or exc}); "
                              f"write runs on a local disk") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                         # locked a file its holder had just removed
    os.ftruncate(fd, 0)
    os.write(fd, f"{_HOST}-{os.getpid()}\n".encode())
    return fd


def _read_holder(fd):
    """``(host, pid)`` written in a locked file; ``(None, None)`` while its holder has
    not written it yet (or never will)."""
    for _ in range(_HOLDER_READS):
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            host, pid = text.split("-")
            return host, int(pid)
        except (OSError, ValueError):
            time.sleep(0.01)
    return None, None


def lock_holder(folder):
    """Who holds ``folder``'s lock, as the refusal names it (``"process N of this machine"``),
    or None when nobody does (no lock file, or its writer has died). Read from the lock
    file's text: no lock is taken, so a trainer starting meanwhile is not refused."""
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
    except OSError:
        return None
    try:
        host, pid = _read_holder(fd)
    finally:
        os.close(fd)
    if pid is None or (host == _HOST and not _is_running(pid)):
        return None
    return _holder_name(host, pid)


def _holder_name(host, pid):
    if host is None:
        return "another process"
    return f"process {pid} of {'this' if host == _HOST else 'another'} machine"


def _in_use_message(folder, holder):
    return f"{folder} is in use by {_holder_name(*holder)} (another train.py?); wait for it to end"
