"""Reading a file whose name came from data (a manifest entry, a `latest` pointer, a lock, a shard list)
without trusting that name.

The rule, for every such read in the framework (data_pipeline and pretrain both use this module):
- the name resolves, after realpath, inside the realpath of its configured root (run_dir, data.dir,
  model.init_from). A root that is itself a symlink is fine: its target is the root;
- the file is a regular file (not a FIFO, device, socket or folder), checked on the open descriptor,
  so a swap between the check and the open changes nothing;
- small files are read with a size cap; nothing of a file's content is ever put in an error message.

Opening uses O_NONBLOCK, so a FIFO planted under a trusted name fails at once instead of blocking
until a writer appears; the flag is cleared before reading a regular file.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO


class UnsafeFileError(ValueError):
    """A file named by data that the run must not read; the message names the file, never its content."""


def inside(root: str | os.PathLike, name: str | os.PathLike) -> Path:
    """The real path of `name` (relative names are taken from `root`), refused unless it lies inside the
    real path of `root`."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / name))
    if real != real_root and real_root not in real.parents:
        raise UnsafeFileError(f"{Path(root) / name}: resolves to {real}, outside {real_root}; refusing to read it")
    return real


def open_regular(root: str | os.PathLike, name: str | os.PathLike) -> BinaryIO:
    """Opens `name` under `root` for binary reading: inside the root (see `inside`) and a regular file."""
    path = inside(root, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{Path(root) / name}: no such file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFileError(f"{Path(root) / name}: not a regular file ({_kind(mode)}); refusing to read it")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(root: str | os.PathLike, name: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a small file named by data (a pointer, a lock, a manifest), refused when larger
    than `max_bytes` without reading past the cap."""
    with open_regular(root, name) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeFileError(f"{Path(root) / name}: larger than {max_bytes} bytes; refusing to read it")
    return data


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return word
    return "not a plain file"
