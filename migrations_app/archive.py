"""A kept checkpoint as one file: a zstd-compressed tar holding a manifest and the payload.

- `manifest.json` (first): what the checkpoint is (name, kind, workload,
  the container's configuration and image), which CRIU and kernel made it,
  the payload's size, SHA-256 and file list, and a SHA-256 of the manifest
  itself;
- `payload.tar`: the kept directory as the host's GNU tar wrote it
  (`checkpoint/` with CRIU's images, `diff/` with a container's writable
  layer, owners and overlay xattrs kept).

verify() reads the whole file and checks both checksums and every payload
path before anything is sent to a host, so a damaged, truncated or
tampered archive changes nothing anywhere. zstd (python-zstandard) writes
its own frame checksum too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import zstandard

FORMAT = "criuweb-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
PAYLOAD = "payload.tar"
CHUNK = 1 << 20
MANIFEST_MAX = 16 << 20
TOP_DIRS = {"checkpoint", "diff"}


class ArchiveError(Exception):
    """The archive cannot be used; the message says why."""


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _seal(manifest: dict) -> dict:
    manifest["sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    return manifest


def write(path: str | Path, checkpoint: dict, chunks: Iterable[bytes], level: int = 3) -> dict:
    """Write an archive of a payload tar stream (chunks); return its manifest.

    The payload is spooled to a temporary file first: its size and checksum
    go into the manifest, which comes first in the archive.
    """
    path = Path(path)
    digest = hashlib.sha256()
    size = 0
    with tempfile.TemporaryFile(dir=path.parent) as spool:
        for chunk in chunks:
            spool.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        spool.seek(0)
        files = _scan_payload(spool, checkpoint.get("kind"))
        manifest = _seal({
            "format": FORMAT,
            "version": VERSION,
            "checkpoint": checkpoint,
            "payload": {"size": size, "sha256": digest.hexdigest(), "files": files},
        })  # fmt: skip
        spool.seek(0)
        part = path.with_name(path.name + ".part")
        with open(part, "wb") as out:
            writer = zstandard.ZstdCompressor(level=level, write_checksum=True).stream_writer(out, closefd=False)
            with writer, tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mode = len(raw), 0o644
                tar.addfile(info, _BytesReader(raw))
                info = tarfile.TarInfo(PAYLOAD)
                info.size, info.mode = size, 0o644
                tar.addfile(info, spool)
        part.rename(path)
    return manifest


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return out


def _open(path: str | Path) -> tuple[IO[bytes], tarfile.TarFile]:
    f = open(path, "rb")
    reader = zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
    return reader, tarfile.open(fileobj=reader, mode="r|")


def _manifest_from(tar: tarfile.TarFile) -> dict:
    member = tar.next()
    if member is None or member.name != MANIFEST or not member.isreg() or member.size > MANIFEST_MAX:
        raise ArchiveError(f"not a criuweb checkpoint archive (its first member is not {MANIFEST})")
    try:
        manifest = json.loads(tar.extractfile(member).read())
    except ValueError as e:
        raise ArchiveError(f"its manifest is damaged (not JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError("not a criuweb checkpoint archive (unknown manifest format)")
    if manifest.get("version") != VERSION:
        raise ArchiveError(f"archive format version {manifest.get('version')!r} is not {VERSION}")
    if manifest.get("sha256") != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise ArchiveError("the manifest does not match its checksum: the archive was changed or damaged")
    if not isinstance(manifest.get("checkpoint"), dict) or not isinstance(manifest.get("payload"), dict):
        raise ArchiveError("the manifest lacks the checkpoint or payload description")
    return manifest


def _errors():
    return (tarfile.TarError, zstandard.ZstdError, EOFError, OSError)


def read_manifest(path: str | Path) -> dict:
    """The archive's manifest, checked against its own checksum (the payload is not read)."""
    try:
        reader, tar = _open(path)
        with reader:
            return _manifest_from(tar)
    except ArchiveError:
        raise
    except _errors() as e:
        raise ArchiveError(f"cannot read the archive: {e}") from None


def verify(path: str | Path) -> dict:
    """Check the whole archive: manifest, payload size and checksum, payload paths; return the manifest."""
    try:
        reader, tar = _open(path)
        with reader:
            manifest = _manifest_from(tar)
            expected = manifest["payload"]
            digest = hashlib.sha256()
            size = 0
            member = tar.next()
            if member is None or member.name != PAYLOAD or not member.isreg():
                raise ArchiveError(f"the archive holds no {PAYLOAD}")
            # The sizes are the sender's word (the manifest's checksum is no
            # signature): checked before the payload is spooled, so a small
            # archive of zeros cannot fill the controller's disk.
            if member.size != expected.get("size"):
                raise ArchiveError("the payload's size is not the manifest's: the archive was changed or damaged")
            free = shutil.disk_usage(tempfile.gettempdir()).free
            if member.size + CHUNK > free:
                raise ArchiveError(
                    f"the payload unpacks to {member.size} B, more than the {free} B free on the controller "
                    f"({tempfile.gettempdir()}) to check it"
                )
            with tempfile.TemporaryFile() as spool:
                for chunk in _chunks(tar.extractfile(member)):
                    digest.update(chunk)
                    size += len(chunk)
                    spool.write(chunk)
                if size != expected.get("size") or digest.hexdigest() != expected.get("sha256"):
                    raise ArchiveError(
                        "the payload does not match the manifest's checksum: the archive was changed or damaged"
                    )
                spool.seek(0)
                _scan_payload(spool, manifest["checkpoint"].get("kind"))
            if tar.next() is not None:
                raise ArchiveError("the archive holds more than a manifest and a payload")
            # Reading to the end makes zstd check its frame checksum.
            while reader.read(CHUNK):
                pass
        return manifest
    except ArchiveError:
        raise
    except _errors() as e:
        raise ArchiveError(f"the archive is damaged or truncated: {e}") from None


def payload_chunks(path: str | Path, manifest: dict) -> Iterator[bytes]:
    """The payload, read again from the archive and checked against the manifest as it goes.

    Raises ArchiveError after the last chunk when it does not match (the file
    changed since verify()); the receiver must then discard what it got.
    """
    try:
        reader, tar = _open(path)
        with reader:
            _manifest_from(tar)
            member = tar.next()
            if member is None or member.name != PAYLOAD:
                raise ArchiveError(f"the archive holds no {PAYLOAD}")
            digest = hashlib.sha256()
            for chunk in _chunks(tar.extractfile(member)):
                digest.update(chunk)
                yield chunk
    except ArchiveError:
        raise
    except _errors() as e:
        # Cut short or damaged since verify() read it whole.
        raise ArchiveError(f"the archive is damaged or truncated: {e}") from None
    if digest.hexdigest() != manifest["payload"]["sha256"]:
        raise ArchiveError("the payload changed since it was verified")


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _scan_payload(f: IO[bytes], kind: Any) -> list[list]:
    """The payload's files as [path, size, type]; ArchiveError for a path that could escape.

    CRIU's images are only files and directories. A writable layer may hold
    links and devices (overlay whiteouts are 0:0 character devices), but no
    path may leave the directory: no absolute path, no "..", nothing under a
    link.
    """
    files = []
    links: set[str] = set()
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                p = PurePosixPath(m.name)
                parts = [x for x in p.parts if x not in (".",)]
                if p.is_absolute() or ".." in parts:
                    raise ArchiveError(f"the payload names a path outside its directory: {m.name!r}")
                if not parts:
                    continue
                if parts[0] not in TOP_DIRS or (parts[0] == "diff" and kind != "container"):
                    raise ArchiveError(f"the payload holds {m.name!r}, outside checkpoint/ and diff/")
                clean = "/".join(parts)
                if any(clean.startswith(link + "/") for link in links):
                    raise ArchiveError(f"the payload writes {m.name!r} through a link")
                if parts[0] == "checkpoint" and not (m.isreg() or m.isdir()):
                    raise ArchiveError(f"the checkpoint holds {m.name!r}, which is not a regular file")
                if m.islnk():
                    target = PurePosixPath(m.linkname)
                    if target.is_absolute() or ".." in target.parts:
                        raise ArchiveError(f"the payload links {m.name!r} to a path outside its directory")
                if m.issym() or m.islnk():
                    links.add(clean)
                files.append([clean, m.size, m.type.decode()])
    except tarfile.TarError as e:
        raise ArchiveError(f"the payload is not a readable tar: {e}") from None
    if not any(name == "checkpoint" or name.startswith("checkpoint/") for name, _, _ in files):
        raise ArchiveError("the payload holds no checkpoint/")
    return files
