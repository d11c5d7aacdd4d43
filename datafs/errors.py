"""Internal errors carry the errno a local filesystem would return.

Code below `fs.py` raises `FsError` (or lets an `OSError` escape); `fs.py`
converts both to `pyfuse3.FUSEError` in one place, and anything else becomes
EIO with a log line. `UsageError` is for people: the CLI prints its message as
one line and exits non-zero.
"""

from __future__ import annotations

import errno as _errno


class FsError(Exception):
    """A failure that maps to one errno at the FUSE boundary."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


def _kind(name: str, code: int) -> type[FsError]:
    return type(name, (FsError,), {"errno": code, "__doc__": f"errno {_errno.errorcode[code]}"})


NotFound = _kind("NotFound", _errno.ENOENT)
Exists = _kind("Exists", _errno.EEXIST)
NotEmpty = _kind("NotEmpty", _errno.ENOTEMPTY)
IsDirectory = _kind("IsDirectory", _errno.EISDIR)
NotDirectory = _kind("NotDirectory", _errno.ENOTDIR)
Invalid = _kind("Invalid", _errno.EINVAL)
NameTooLong = _kind("NameTooLong", _errno.ENAMETOOLONG)
NoSpace = _kind("NoSpace", _errno.ENOSPC)
NoAttr = _kind("NoAttr", _errno.ENODATA)
NotPermitted = _kind("NotPermitted", _errno.EPERM)
TooManyLinks = _kind("TooManyLinks", _errno.EMLINK)
CrossDevice = _kind("CrossDevice", _errno.EXDEV)
RangeError = _kind("RangeError", _errno.ERANGE)
FileTooBig = _kind("FileTooBig", _errno.EFBIG)
BadHandle = _kind("BadHandle", _errno.EBADF)
NotSupported = _kind("NotSupported", _errno.EOPNOTSUPP)


class MetaUnavailable(FsError):
    """The metadata engine did not answer (or kept conflicting) within its
    deadline: the request fails with EIO and the mount goes on serving."""

    errno = _errno.EIO


class StoreError(Exception):
    """An object-store failure. `temporary` says whether a retry may succeed."""

    def __init__(self, message: str, *, temporary: bool):
        super().__init__(message)
        self.temporary = temporary


class ChunkMissing(StoreError):
    """The store has no object for this chunk (yet): it may still be uploading elsewhere."""

    def __init__(self, chunk_id: str):
        super().__init__(f"chunk {chunk_id} is not in the object store", temporary=True)
        self.chunk_id = chunk_id


class ChunkCorrupt(StoreError):
    """Bytes that came back do not hash to the chunk's id."""

    def __init__(self, chunk_id: str, source: str):
        super().__init__(f"chunk {chunk_id} from {source} failed BLAKE3 verification", temporary=True)
        self.chunk_id = chunk_id


class UsageError(Exception):
    """A mistake by the person at the command line: printed as one line, exit 2."""
