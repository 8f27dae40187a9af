"""The evaluation data files: plain text in the repository's datasets/ folder (not a Python package, see its
README), and the filler sentences retrieval tasks hide their needles in."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from workbench.errors import ParameterError, WorkbenchError

DATA_DIR = Path(__file__).resolve().parents[2] / "datasets"
TEXT = "harbor_town.txt"  # self-written, about 4.3k SmolLM2 tokens; see datasets/README.md

# The classic passkey haystack (Mohtashami & Jaggi, "Landmark Attention", 2023): one group of sentences, repeated.
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

FILLERS = ("repeat", "text")


def data_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise WorkbenchError(f"evaluation data file {path} is missing; workbench.eval reads datasets/ from a "
                             "source checkout (pip install -e .)")
    return path


@functools.lru_cache(maxsize=8)
def read_text(name: str | Path = TEXT) -> str:
    """A text file's body: the datasets/ file of that name (its title line dropped), or any file by path."""
    if isinstance(name, Path) or "/" in str(name):
        path = Path(name)
        if not path.is_file():
            raise ParameterError(f"text file {path} does not exist")
        return path.read_text(encoding="utf-8").strip()
    lines = data_file(name).read_text(encoding="utf-8").strip().splitlines()
    return "\n".join(lines[1:]).strip()


def sentences(text: str) -> list[str]:
    """Split text into sentences at '.', '!' or '?' followed by whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def filler_sentences(filler: str | Path) -> list[str]:
    """The units a haystack is made of: "repeat" (the classic passkey sentence group, one unit), "text" (the
    sentences of datasets/harbor_town.txt, in order), or a path to a text file of your own."""
    if filler == "repeat":
        return sentences(REPEAT)
    if filler == "text":
        return sentences(" ".join(read_text(TEXT).split()))
    if isinstance(filler, Path) or str(filler).endswith(".txt"):
        units = sentences(" ".join(read_text(Path(filler)).split()))
        if not units:
            raise ParameterError(f"filler file {filler} holds no sentences")
        return units
    raise ParameterError(f"filler {filler!r} is not known; use one of {', '.join(FILLERS)} or a path to a .txt file")
