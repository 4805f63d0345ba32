"""torch's zip format (``torch.save`` since 1.6) and TorchScript archives.

Only the central directory, ``data.pkl`` and the small text records are read; each storage
record's position is taken from its local header so writers can copy it byte for byte.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError
from ..model import Checkpoint, StorageInfo
from ..source import file_view, is_url, open_source
from ..unpickling.parsed import known_directory
from ..unpickling.scan import check_views, unpickle
from ..unpickling.unpickler import StorageType

MAX_PICKLE_BYTES = 1 << 30  # a data.pkl larger than this is not a checkpoint we can inspect
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032:1: larger claims are bombs
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_NAME_EXTRA = struct.Struct("<2H")  # the local header's name and extra lengths, at 26
ADVISE_MIN = 16  # fewer records: their headers are read unadvised (a few waits at most)
_RECORD_FOLDERS = ("data/", "constants/")  # the storage records data.pkl and constants.pkl name


class ZipArchive:
    """A torch zip archive's entries under its single root folder.

    ``base`` (not None) reads an archive stored inside a larger file at that offset (``file_bytes``
    is then the archive's length): DCP's items are such archives. Offsets it returns are
    absolute in the file.

    ``headers`` maps local header offsets to (name, data offset) where the caller has proved
    what the header holds: a writer re-reading records it cloned from an input whose headers
    it read and checked (``writers/zip_runs.py``; a clone has no page cache of its own, so
    each header would be a read from the disk). Such a header is not read again.
    """

    def __init__(
        self,
        path: str,
        file_bytes: int,
        base: int | None = None,
        headers: dict[int, tuple[bytes, int]] | None = None,
    ) -> None:
        self.path = path
        self.headers = headers or {}
        self.file_bytes = file_bytes
        self.base = base or 0
        self.source = open_source(path)  # a local file or a URL read by range requests
        self.window = file_view(self.source, self.base, file_bytes if base is not None else None)
        if base is not None and hasattr(self.source, "prefetch"):  # a zip inside a file at a
            tail = min(file_bytes, 4096)  # URL (a DCP item): its end record and directory at once
            self.source.prefetch(tail, self.base + file_bytes - tail)
        infos = self._infos()
        if not infos:
            raise CheckpointError(path, "is an empty zip archive, not a torch checkpoint")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise CheckpointError(path, f"zip archive lists {dup!r} twice (a tampered file)")
        folded: dict[str, str] = {}  # torch (miniz) looks names up case-insensitively
        for n in names:
            if folded.setdefault(n.lower(), n) != n:
                raise CheckpointError(
                    path,
                    f"zip archive lists {folded[n.lower()]!r} and {n!r}, which torch does not "
                    "tell apart (a tampered file)",
                )
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise CheckpointError(
                path, f"zip entries lie under several roots ({', '.join(sorted(roots)[:3])})"
            )
        self.root = roots.pop()
        for info in infos:
            end = info.header_offset + info.compress_size
            if not 0 <= info.header_offset < file_bytes or end > file_bytes:
                raise CheckpointError(
                    path, f"is truncated: zip entry {info.filename!r} lies past the end of the file"
                )
            if info.flag_bits & 0x1:
                raise CheckpointError(path, f"zip entry {info.filename!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise CheckpointError(
                    path, f"zip entry {info.filename!r} uses unsupported compression"
                )
            if (
                info.compress_type == zipfile.ZIP_DEFLATED
                and info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 1024
            ):
                raise CheckpointError(
                    path,
                    f"zip entry {info.filename!r} claims {info.file_size:,} bytes from "
                    f"{info.compress_size:,} compressed (a zip bomb)",
                )
        self.entries = {i.filename[len(self.root) + 1 :]: i for i in infos}
        self._folded = {k.lower(): k for k in self.entries}

    def _infos(self) -> list[zipfile.ZipInfo]:
        """The archive's entries as ``zipfile`` lists them: as the verdict's zip model listed
        them, when it did for these very bytes (``unpickling/parsed.py``), else afresh."""
        if not is_url(self.path):
            infos = known_directory(
                self.file_bytes, lambda n, at: self.source.pread(n, self.base + at)
            )
            if infos is not None:
                return infos
        self.zf = self._open_zip()
        return self.zf.infolist()

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.window)
        except CheckpointError:  # a URL that failed while zipfile read it
            self.close()
            raise
        except Exception as exc:  # zipfile raises many kinds of errors on damaged archives
            self.close()
            reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise CheckpointError(
                self.path, f"is a damaged or truncated zip archive ({reason})"
            ) from None

    def has(self, name: str) -> bool:
        return name in self.entries or name.lower() in self._folded

    def _info(self, name: str) -> zipfile.ZipInfo:
        """The entry torch reads for ``name`` (miniz matches names case-insensitively)."""
        return self.entries.get(name) or self.entries[self._folded[name.lower()]]

    def read_small(self, name: str, limit: int = MAX_PICKLE_BYTES) -> bytes:
        """An entry's bytes, read the way torch reads them: CRCs are not checked.

        torch ignores CRCs (it can even write files without them), so a scanner that stops at
        a bad CRC misses what torch would load; ckpttool reads what torch reads.
        """
        info = self._info(name)
        if info.file_size > limit:
            raise CheckpointError(
                self.path, f"{name} is {info.file_size:,} bytes, more than a checkpoint needs"
            )
        offset = self.data_offset(info)
        if offset - self.base + info.compress_size > self.file_bytes:
            raise CheckpointError(self.path, f"is truncated: {name} is cut short")
        raw = self.source.pread(info.compress_size, offset)
        if len(raw) < info.compress_size:
            raise CheckpointError(self.path, f"is truncated: {name} is cut short")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise CheckpointError(self.path, f"zip entry {name} has inconsistent sizes")
            return raw
        try:
            inflater = zlib.decompressobj(-15)
            data = inflater.decompress(raw, info.file_size + 1)
        except zlib.error as exc:
            raise CheckpointError(self.path, f"cannot inflate {name} ({exc})") from None
        if len(data) != info.file_size:
            raise CheckpointError(self.path, f"zip entry {name} inflates to the wrong size")
        return data

    def will_read_headers(self) -> None:
        """Advise the storage records' local headers, which :meth:`data_offset` reads next, where
        the source takes advice (a local file: ``LocalSource.will_read``). A checkpoint not in
        the page cache then reads its thousand headers in one queue, not one wait each."""
        will_read = getattr(self.source, "will_read", None)
        if will_read is None or len(self.entries) < ADVISE_MIN:
            return
        base, proven = self.base, self.headers
        will_read(
            (base + i.header_offset, _LOCAL_HEADER.size + len(i.orig_filename.encode("utf-8")))
            for name, i in self.entries.items()
            if name.startswith(_RECORD_FOLDERS) and base + i.header_offset not in proven
        )

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        """Absolute offset of an entry's (possibly compressed) bytes, checked against its header."""
        header_offset = self.base + info.header_offset
        utf8 = info.orig_filename.encode("utf-8")
        proven = self.headers.get(header_offset)
        if proven is not None and proven[0] == utf8:
            return proven[1]
        # one read for the header and the name it should hold (torch's writer: always so)
        header = self.source.pread(_LOCAL_HEADER.size + len(utf8), header_offset)
        if len(header) < _LOCAL_HEADER.size:
            raise CheckpointError(self.path, f"is truncated: {info.filename} is missing")
        if header[:4] != b"PK\x03\x04":
            raise CheckpointError(self.path, f"zip entry {info.filename!r} has a bad header")
        name_len, extra_len = _NAME_EXTRA.unpack_from(header, 26)
        name = header[_LOCAL_HEADER.size : _LOCAL_HEADER.size + name_len]
        if name_len != len(utf8):
            name = self.source.pread(name_len, header_offset + _LOCAL_HEADER.size)
        if name != utf8 and name != info.orig_filename.encode("cp437", "replace"):
            raise CheckpointError(
                self.path,
                f"zip entry {info.filename!r} is named {name[:60]!r} in its local header "
                "(a tampered file)",
            )
        return header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def record_offset(self, info: zipfile.ZipInfo) -> int:
        """A storage record's data offset: from its local header for a local file; for a URL
        (one request per record otherwise) where torch's writer puts it, checked against the
        local header when the record's bytes are first read."""
        expect = getattr(self.source, "expect", None)
        if expect is None:
            return self.data_offset(info)
        # torch pads relative to the archive's start (a DCP item is a zip written at an offset)
        predicted = self.base + _torch_data_offset(info.header_offset, info, self.alignment())

        def check() -> None:
            if self.data_offset(info) != predicted:
                raise CheckpointError(
                    self.path,
                    f"zip record {info.filename!r} does not lie where torch's writer puts it "
                    "(a file rewritten by another zip tool?): download it and run ckpttool on "
                    "the local copy",
                )

        expect(predicted, predicted + info.compress_size, check)
        return predicted

    def alignment(self) -> int:
        """Where torch aligns storage records (``.storage_alignment``, 64 before it existed)."""
        if not hasattr(self, "_alignment"):
            text = b"64"
            if self.has(".storage_alignment"):
                text = self.read_small(".storage_alignment", 16)
            self._alignment = int(text) if text.strip().isdigit() and int(text) > 0 else 64
        return self._alignment

    def close(self) -> None:
        if hasattr(self, "zf"):
            self.zf.close()
        self.window.close()
        self.source.close()


def _torch_data_offset(header: int, info: zipfile.ZipInfo, alignment: int) -> int:
    """Where torch's zip writer (``getPadding`` in caffe2's ``inline_container.cc``) starts
    a record's data: after the local header, the name and a padding extra field (and zip64
    fields past 4 GiB), at the next multiple of ``alignment``."""
    start = header + _LOCAL_HEADER.size + len(info.orig_filename.encode("utf-8")) + 4
    if info.file_size >= 0xFFFFFFFF or header >= 0xFFFFFFFF:
        start += 4 + (16 if info.file_size >= 0xFFFFFFFF else 0)
        start += 8 if header >= 0xFFFFFFFF else 0
    return start + (-start % alignment)


def read(
    path: str,
    file_bytes: int,
    seen: dict[str, str] | None = None,
    *,
    base: int | None = None,
    headers: dict[int, tuple[bytes, int]] | None = None,
) -> Checkpoint:
    """Read a torch zip; with ``base``, the archive lying at that offset, ``file_bytes`` long
    (``headers``: see :class:`ZipArchive`)."""
    archive = ZipArchive(path, file_bytes, base, headers)
    try:
        return _read(archive, path, file_bytes, {} if seen is None else seen)
    finally:
        archive.close()


def _read(archive: ZipArchive, path: str, file_bytes: int, seen: dict[str, str]) -> Checkpoint:
    is_torchscript = archive.has("constants.pkl") and any(
        n.startswith("code/") for n in archive.entries
    )
    if not archive.has("data.pkl"):
        raise CheckpointError(path, f"zip archive has no {archive.root}/data.pkl: not a checkpoint")
    byteorder, facts = _byteorder_and_facts(archive, path)
    records = _Records(archive, path, file_bytes, byteorder == "big")
    storages = records.storages
    pkl = archive.read_small("data.pkl")
    archive.will_read_headers()  # the pickle's storages find their records through them
    root, unpickler = unpickle(path, io.BytesIO(pkl), "data.pkl", records.resolver("data"), seen)
    tensors = list(unpickler.tensors)
    if is_torchscript:
        facts["torchscript"] = True
        if archive.has("constants.pkl"):
            consts, cu = unpickle(
                path,
                io.BytesIO(archive.read_small("constants.pkl")),
                "constants.pkl",
                records.resolver("constants"),
                seen,
            )
            tensors += cu.tensors
            facts["constants_storages"] = sum(1 for k in storages if k.startswith("constants/"))
            if cu.tensors:
                root = {"data": root, "constants": consts}
    check_views(path, tensors)
    return Checkpoint(
        path=path,
        format="torchscript" if is_torchscript else "zip",
        file_bytes=file_bytes,
        root=root,
        storages={s.key: s for s in storages.values()},
        globals=list(seen),
        facts=facts,
    )


def _byteorder_and_facts(archive: ZipArchive, path: str) -> tuple[str, dict[str, Any]]:
    """The archive's byte order ("little" unless it says otherwise) and the facts it records."""
    byteorder = "little"
    if archive.has("byteorder"):
        byteorder = archive.read_small("byteorder", 16).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(path, f"unknown byteorder {byteorder!r}")
    facts: dict[str, Any] = {"archive_name": archive.root}
    if archive.has("version"):
        facts["record_version"] = archive.read_small("version", 64).decode("ascii", "replace")
        facts["record_version"] = facts["record_version"].strip()
    if archive.has("byteorder"):
        facts["byteorder"] = byteorder
    return byteorder, facts


class _Records:
    """The storage records the pickles declare, checked against the zip directory."""

    def __init__(self, archive: ZipArchive, path: str, file_bytes: int, big_endian: bool) -> None:
        self.archive = archive
        self.path = path
        self.file_bytes = file_bytes
        self.big_endian = big_endian
        self.storages: dict[str, StorageInfo] = {}  # by record name below the archive's root

    def resolver(self, folder: str) -> Callable[[StorageType, str, str, int], StorageInfo]:
        """The persistent-id callback for a pickle whose records lie in ``folder``."""

        return functools.partial(self.resolve, folder)  # called per storage: no extra frame

    def resolve(
        self, folder: str, storage_type: StorageType, key: str, location: str, numel: int
    ) -> StorageInfo:
        archive, path, storages = self.archive, self.path, self.storages
        name = f"{folder}/{key}"
        known = storages.get(name)
        if known is not None:
            if known.dtype != storage_type.dtype or known.numel != numel:
                raise CheckpointError(path, f"storage {key!r} is declared with two sizes")
            return known
        info = archive.entries.get(name)
        if info is None:
            raise CheckpointError(path, f"storage record {archive.root}/{name} is missing")
        itemsize = _itemsize(storage_type.dtype)
        if info.file_size != numel * itemsize:
            raise CheckpointError(
                path,
                f"storage record {archive.root}/{name} holds {info.file_size:,} bytes but "
                f"the pickle declares {numel:,} {storage_type.dtype} elements "
                f"({numel * itemsize:,} bytes)",
            )
        storage = StorageInfo.quick(
            key if folder == "data" else name,
            storage_type.dtype,
            numel,
            location,
            path,
            archive.record_offset(info),
            info.filename,
            info.compress_type != zipfile.ZIP_STORED,  # compressed
            self.big_endian,
            # torch can write records without CRCs (zeros): then there is none to check
            info.CRC if info.CRC or not info.file_size else None,
            archive.base + info.header_offset,
        )
        if (
            not storage.compressed
            and storage.offset + info.file_size > archive.base + self.file_bytes
        ):
            raise CheckpointError(path, f"is truncated: storage record {name} is cut short")
        storages[name] = storage
        return storage


_ITEMSIZES: dict[str, int] = {}


def _itemsize(dtype: str) -> int:
    size = _ITEMSIZES.get(dtype)
    if size is None:
        from .. import dtypes

        size = _ITEMSIZES[dtype] = dtypes.get(dtype).itemsize
    return size


__all__ = ["ZipArchive", "read"]
