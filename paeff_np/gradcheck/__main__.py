"""``python -m paeff_np.gradcheck``: the gradient-check table (``report.py``)."""
import sys

from .report import main

sys.exit(main())
