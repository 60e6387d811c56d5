"""``python -m paeff_np.gradcheck``: the gradient-check table (``report.py``)."""
import os
import sys

from .report import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:          # e.g. `--list | head`: the reader left; no traceback
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 1
sys.exit(code)
