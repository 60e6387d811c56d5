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
import hashlib
import json
import os
import re
import socket
import tempfile

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


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder):
    """Hold ``folder/.paeff.lock`` (``<host>-<pid>``) while this process writes the
    run in ``folder``, so that a second ``train.py`` into it is refused instead of
    interleaving its saves with the first one's. The folder is created if missing
    and removed again, when empty, on the way out. A lock whose holder (this
    host) is no longer running, killed with ``kill -9`` say, is taken over.
    """
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    _take_lock(path, folder)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        if created:
            try:
                os.rmdir(folder)             # only when empty: a refused start leaves nothing
            except OSError:
                pass


def _take_lock(path, folder):
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    host, pid = f.read().strip().split("-")
                pid = int(pid)
            except (OSError, ValueError):
                host, pid = None, None       # unreadable: a holder killed mid-write
            if host == _HOST and pid is not None and pid != os.getpid() and _is_running(pid):
                raise FolderInUse(f"{folder} is in use by process {pid} of this machine (another "
                                  f"train.py?); wait for it to end") from None
            if host not in (_HOST, None):
                raise FolderInUse(f"{folder} is in use by a process of another machine; if none "
                                  f"is running, remove {path}") from None
            os.unlink(path)                  # its holder is gone: take the lock over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{_HOST}-{os.getpid()}\n")
        return
    raise FolderInUse(f"{folder}: could not take {path}")
