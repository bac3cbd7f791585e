"""Wall-clock timing shared by the benchmarks (CUDA work is synchronised around each call)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section ``heading`` of the markdown file ``path`` (up to the next ``## ``
    heading) by ``text`` where it stands, or append it; the rest of the file is kept."""
    sections: "list[list[str]]" = [[]]
    for line in (path.read_text() if path.exists() else "").splitlines():
        if line.startswith("## "):
            sections.append([])
        sections[-1].append(line)
    new = [heading, "", *text.rstrip().splitlines()]
    if any(s and s[0].strip() == heading for s in sections):
        sections = [new if s and s[0].strip() == heading else s for s in sections]
    else:
        sections.append(new)
    parts = ["\n".join(s).strip() for s in sections]
    path.write_text("\n\n".join(p for p in parts if p) + "\n")
