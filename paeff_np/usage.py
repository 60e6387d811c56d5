"""What a command line says to its user, in one place that imports nothing of the
project: the argument parser whose bad flag is one line, and the error for flags or
settings a run cannot take. Every command line (train.py, eval.py, bench.py,
``python -m paeff_np.data``, ``python -m paeff_np.gradcheck``) uses these two."""
import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad flag reported in one line like every other user
    error (``train.py: error: argument --epochs: must be >= 1, got 0 (see --help)``,
    exit 2) instead of after the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(Exception):
    """Flags or settings the run cannot take (e.g. a batch larger than the training set)."""
