"""One exception type for bad user input, so the CLIs can print one clear line and exit non-zero."""
from __future__ import annotations

import sys
from pathlib import Path


class InputError(Exception):
    """A problem with something the user gave us (a file, a flag, a folder).

    The message always names the offending path or flag, e.g.
    ``InputError("datasets/kits/case_00001/imaging.nii.gz", "image is 2D, expected 3D")``.
    """

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")

    def __reduce__(self):
        """Pickled as (where, problem): an error raised in a worker process reaches the parent whole."""
        return InputError, (self.where, self.problem)


EXIT_INPUT_ERROR = 2


def spell_flag(name: str, dashes: str) -> str:
    """An option's name as a command spells it: ``-image_size`` (the seed's single dash) or ``--image-size``."""
    return f"-{name}" if dashes == "-" else f"--{name.replace('_', '-')}"


def report(err: InputError) -> int:
    """Print the one-line ``error: <where>: <problem>`` message every CLI uses and return its exit status (2)."""
    print(f"error: {err}", file=sys.stderr)
    return EXIT_INPUT_ERROR
