"""What a command line does before anything else is imported: a Ctrl-C while NumPy and
the project are still being imported ends in one line, not a traceback. It imports
only ``os`` and ``sys`` (loaded with the interpreter), so it is ready at once; the
package applies it as its first line (``paeff_np/__init__.py``), and train.py,
eval.py and bench.py import the package first."""
import os
import sys

COMMAND_SCRIPTS = ("train.py", "eval.py", "bench.py")   # the command lines at the repository root


def command_name():
    """The command this process runs, as its messages name it (``train.py``, ``python -m
    paeff_np.data``), or None when it is no paeff_np command (a script or a test that
    imports the library)."""
    if sys.argv[:1] == ["-m"]:        # python -m paeff_np.X while its packages are imported
        argv = getattr(sys, "orig_argv", [])
        module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
        return f"python -m {module}" if module.split(".")[0] == "paeff_np" else None
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(main) in COMMAND_SCRIPTS and os.path.dirname(os.path.abspath(main)) == root:
        return os.path.basename(main)
    return None


def interrupts_in_one_line():
    """In a command line, a Ctrl-C that no handler catches (while the imports run, before
    ``run.cli.run`` takes over) ends in ``prog: interrupted`` on stderr, not a traceback;
    Python's exit status (killed by SIGINT) is kept. A library import changes nothing."""
    prog = command_name()
    if prog is None or getattr(sys.excepthook, "one_line_interrupts", False):
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print(f"\n{prog}: interrupted", file=sys.stderr)
        else:
            previous(kind, value, traceback)
    hook.one_line_interrupts = True
    sys.excepthook = hook
