"""The checkpoint archive format: what it holds, and what it refuses."""

import io
import json
import tarfile

import pytest
import zstandard

from migrations_app import archive


def payload(members):
    """A payload tar from (name, type, data or link target) triples."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD = [
    ("checkpoint", "dir", None),
    ("checkpoint/inventory.img", "file", b"inventory" * 100),
    ("checkpoint/pages-1.img", "file", bytes(range(256)) * 64),
    ("diff", "dir", None),
    ("diff/bin", "dir", None),
    ("diff/bin/sh", "sym", "/bin/busybox"),
    ("diff/note.txt", "file", b"written"),
]
DESCRIBED = {"name": "cp1", "kind": "container", "criu_version": "4.2.1", "kernel": "6.18.0"}


def write(tmp_path, members=GOOD, described=DESCRIBED):
    path = tmp_path / "cp1.tar.zst"
    data = payload(members)
    manifest = archive.write(path, dict(described), [data[i : i + 1000] for i in range(0, len(data), 1000)])
    return path, manifest, data


def test_round_trip(tmp_path):
    path, manifest, data = write(tmp_path)
    assert manifest["checkpoint"]["criu_version"] == "4.2.1"
    assert manifest["payload"]["size"] == len(data)
    assert ["checkpoint/inventory.img", 900, "0"] in manifest["payload"]["files"]
    assert archive.verify(path) == manifest
    assert archive.read_manifest(path) == manifest
    assert b"".join(archive.payload_chunks(path, manifest)) == data
    # It is zstd, and a tar whose first member is the manifest.
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getnames() == ["manifest.json", "payload.tar"]
    assert not (tmp_path / "cp1.tar.zst.part").exists()


def test_a_flipped_byte_is_refused(tmp_path):
    path, _, _ = write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(archive.ArchiveError, match="damaged|changed|checksum"):
        archive.verify(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_truncated_archive_is_refused(tmp_path, keep):
    path, _, _ = write(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(archive.ArchiveError):
        archive.verify(path)


def rewrite(path, change_manifest=None, change_payload=None):
    """Rebuild an archive with its manifest or payload changed (checksums left as they were)."""
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        data = tar.extractfile("payload.tar").read()
    if change_manifest:
        change_manifest(manifest)
    if change_payload:
        data = change_payload(data)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in (("manifest.json", json.dumps(manifest).encode()), ("payload.tar", data)):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path.write_bytes(zstandard.ZstdCompressor().compress(out.getvalue()))


def test_an_edited_manifest_is_refused(tmp_path):
    path, _, _ = write(tmp_path)
    rewrite(path, change_manifest=lambda m: m["checkpoint"].update(criu_version="3.0"))
    with pytest.raises(archive.ArchiveError, match="manifest does not match its checksum"):
        archive.read_manifest(path)


def test_an_edited_payload_is_refused(tmp_path):
    path, _, _ = write(tmp_path)
    rewrite(path, change_payload=lambda d: d.replace(b"written", b"WRITTEN"))
    with pytest.raises(archive.ArchiveError, match="payload does not match"):
        archive.verify(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        (("checkpoint/../../etc/x", "file", b"x"), "outside its directory"),
        (("/etc/x", "file", b"x"), "outside its directory"),
        (("checkpoint/log", "sym", "/etc/shadow"), "not a regular file"),
        (("other/x", "file", b"x"), "outside checkpoint/ and diff/"),
        (("diff/etc", "sym", "/etc"), None),  # a link alone is a writable layer's right ...
    ],
)
def test_payload_paths_that_could_escape_are_refused(tmp_path, bad, message):
    members = GOOD + [bad]
    if message is None:
        # ... but nothing may be written through it.
        members.append(("diff/etc/passwd", "file", b"root::0:0"))
        message = "through a link"
    with pytest.raises(archive.ArchiveError, match=message):
        write(tmp_path, members)


def test_a_process_checkpoint_has_no_writable_layer(tmp_path):
    with pytest.raises(archive.ArchiveError, match="outside checkpoint/ and diff/"):
        write(tmp_path, described={**DESCRIBED, "kind": "process"})
    path, manifest, _ = write(tmp_path, GOOD[:3], {**DESCRIBED, "kind": "process"})
    assert archive.verify(path)["checkpoint"]["kind"] == "process"


def test_not_an_archive(tmp_path):
    path = tmp_path / "x.tar.zst"
    path.write_bytes(b"hello, not zstd")
    with pytest.raises(archive.ArchiveError, match="cannot read|damaged"):
        archive.read_manifest(path)


def test_a_payload_larger_than_the_controller_can_spool_is_refused_before_reading_it(tmp_path):
    """The manifest's checksum is no signature: a sender can declare any size. A payload
    bigger than the controller's free space is refused before anything is spooled (a
    small archive of zeros would fill the disk); this one is short of what it declares,
    which a reader going on would only notice at its end."""
    path, _, _ = write(tmp_path)
    huge = 1 << 50
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        data = tar.extractfile("payload.tar").read()
    manifest["payload"]["size"] = huge
    archive._seal(manifest)
    content = json.dumps(manifest).encode()
    info = tarfile.TarInfo("manifest.json")
    info.size = len(content)
    header = tarfile.TarInfo("payload.tar")
    header.size = huge
    stream = info.tobuf(format=tarfile.PAX_FORMAT) + content + bytes(-len(content) % tarfile.BLOCKSIZE)
    stream += header.tobuf(format=tarfile.PAX_FORMAT) + data
    path.write_bytes(zstandard.ZstdCompressor().compress(stream))
    assert archive.read_manifest(path)["payload"]["size"] == huge  # the manifest itself checks out
    with pytest.raises(archive.ArchiveError, match="more than the .* B free on the controller"):
        archive.verify(path)


def test_a_payload_whose_size_is_not_the_manifests_is_refused_before_reading_it(tmp_path):
    path, _, _ = write(tmp_path)
    rewrite(path, change_payload=lambda d: d + bytes(tarfile.RECORDSIZE))
    with pytest.raises(archive.ArchiveError, match="size is not the manifest's"):
        archive.verify(path)
