"""Writing reports: a folder appears complete or not at all.

:func:`report_dir` yields a temporary sibling folder; on success it replaces
the target (``reports/<name>``), on failure it is deleted, so a crashed study
leaves no half-written report.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

REPORTS_ROOT = Path("reports")


@contextlib.contextmanager
def report_dir(name_or_path) -> Iterator[Path]:
    target = Path(name_or_path)
    if not target.is_absolute() and len(target.parts) == 1:
        target = REPORTS_ROOT / target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name[-8:]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return _jsonable(v.tolist())
    return v


def write_json(path, obj) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"
        return str(x)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(out)
