"""Writing files whose contents may come from elsewhere: atomically in their own folder, and as cells that neither
Markdown nor a spreadsheet reads as more than text (docs/security.md)."""

import contextlib
import csv
import errno
import glob
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

from resnet_lab.errors import DiskFullError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` through a temporary file in its own folder, flushed to disk and renamed over the old one: a kill
    or a full disk mid-write leaves the old file whole and no partial one. (A temporary file elsewhere, as fsspec's
    and so Lightning's atomic save make it, is copied over the target when it lies on another file system.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # what a killed write of it left
        stale.unlink(missing_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as an ordinary open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if _disk_full(err):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise DiskFullError(
                f"no space left in {path.parent} to write {path.name} ({free:.0f} MiB free; the previous file, if "
                "any, is intact): free some space, or write elsewhere (runs: --trainer.logger.init_args.save_dir)"
            ) from err
        raise


def _disk_full(err: BaseException | None) -> bool:
    """Whether `err` comes of a full disk (torch.save raises its own error over the OSError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def markdown_cell(value: object) -> str:
    """`value` as the text of one Markdown table cell: a `|` cannot add a column, nor `<`/`>` open HTML or a comment
    (the README's generated-block markers), nor a line break end the row."""
    text = " ".join(str(value).splitlines())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """`value` for a CSV cell: text that a spreadsheet would run as a formula (`=`, `+`, `-`, `@` first) gets a
    leading `'`, which spreadsheets show as text; numbers are left as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return f"'{value}"


def atomic_write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A CSV table of `rows` under `header`, each cell made safe for a spreadsheet (`csv_cell`), written atomically."""
    text = io.StringIO()
    csv.writer(text).writerows([header, *([csv_cell(cell) for cell in row] for row in rows)])
    atomic_write_text(path, text.getvalue())
    return path
