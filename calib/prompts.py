"""Calibration prompts: the bundled default list and prompt files (.txt or PartiPrompts-style .tsv)."""
from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path


def default_prompts() -> list[str]:
    """The bundled list of varied text-to-image prompts (subjects, styles, scenes, lighting)."""
    text = resources.files(__package__).joinpath("default_prompts.txt").read_text(encoding="utf-8")
    return _lines(text)


def read_prompts(path) -> list[str]:
    """Prompts from a file: a .tsv with a header that has a "Prompt" column (PartiPrompts.tsv:
    Prompt, Category, Challenge, Note), or any other file as text with one prompt per line.
    Blank lines and surrounding whitespace are dropped; the order is kept.

    Raises FileNotFoundError for a missing file, ValueError for a file without prompts or a .tsv
    without a Prompt column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    prompts = _tsv_prompts(text, path) if path.suffix.lower() == ".tsv" else _lines(text)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts; write one prompt per line")
    return prompts


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _tsv_prompts(text: str, path: Path) -> list[str]:
    # QUOTE_NONE: prompts may begin with a quotation mark ('"GIGGLE" painted on a wall').
    rows = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(rows, None)
    if header is None:
        raise ValueError(f"prompts file {path} is empty")
    columns = [name.strip() for name in header]
    if "Prompt" not in columns:
        raise ValueError(f"{path} has no 'Prompt' column (its header: {columns}); a .tsv needs a "
                         f"header row naming a Prompt column, or use a .txt with one prompt per line")
    column = columns.index("Prompt")
    return [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
