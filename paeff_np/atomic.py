"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

Readers see the old file or the new one, never half of one, and a write that
fails leaves the old file as it was. Every file the project writes goes
through ``write_atomically``.
"""
import json
import os
import tempfile


def write_atomically(path, write, mode="wb"):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it
    over ``path``: readers see the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1) + "\n"), mode="w")
