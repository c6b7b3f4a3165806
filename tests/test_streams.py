"""What the target does with a stream from a source it cannot trust.

The unpacking scripts run here with the real tar and sh they run with on a
host; the stream is a tar made in the test, as a compromised source could
send it.
"""

import io
import subprocess
import tarfile

import pytest

from migrations_app import criu
from migrations_app.engine.plans.container_engine import UNPACK_CONTAINER
from migrations_app.engine.streams import UNPACK_IMAGES, last_lines


def tar_of(*members):
    """A tar stream of (name, kind, data-or-link-target) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type = tarfile.SYMTYPE
                info.linkname = value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def unpack(script, stream, *args):
    return subprocess.run(["sh", "-c", script, "sh", *args], input=stream, capture_output=True)


def test_images_unpack(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    r = unpack(UNPACK_IMAGES, tar_of(("./inventory.img", "file", b"x"), ("./sub", "dir", None)), str(images))
    assert r.returncode == 0, r.stderr
    assert (images / "inventory.img").read_bytes() == b"x"


@pytest.mark.parametrize("planted", ["restore.log", "holder.pid", "holder.pid.tmp"])
def test_images_with_a_link_are_refused(tmp_path, planted):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    images = tmp_path / "images"
    images.mkdir()
    r = unpack(UNPACK_IMAGES, tar_of(("./inventory.img", "file", b"x"), (f"./{planted}", "link", str(victim))),
               str(images))
    assert r.returncode == 3
    assert f"{planted} is not a regular file or directory" in r.stderr.decode()
    assert not images.exists()  # nothing of it is left for a later step to use
    assert victim.read_text() == "untouched"


def container_dirs(tmp_path):
    staging, checkpoints, upper = tmp_path / "staging", tmp_path / "checkpoints", tmp_path / "upper"
    upper.mkdir()
    return staging, checkpoints, upper


def test_container_stream_unpacks_checkpoint_and_layer(tmp_path):
    staging, checkpoints, upper = container_dirs(tmp_path)
    stream = tar_of(("cp1", "dir", None), ("cp1/inventory.img", "file", b"x"), ("diff", "dir", None),
                    ("diff/note.txt", "file", b"kept"), ("diff/etc-link", "link", "/etc"))
    r = unpack(UNPACK_CONTAINER, stream, str(staging), str(checkpoints), "cp1", str(upper))
    assert r.returncode == 0, r.stderr
    assert (checkpoints / "cp1" / "inventory.img").read_bytes() == b"x"
    assert (upper / "note.txt").read_text() == "kept"
    assert (upper / "etc-link").is_symlink()  # the layer's own links are the container's business
    assert not staging.exists()


@pytest.mark.parametrize("stream, message", [
    # diff itself a link: `cp -a diff/.` would copy this host's /etc into the container.
    (tar_of(("cp1", "dir", None), ("cp1/inventory.img", "file", b"x"), ("diff", "link", "/etc")),
     "diff is not a directory"),
    (tar_of(("cp1", "link", "/tmp"), ("diff", "dir", None)), "cp1 is not a directory"),
    (tar_of(("cp1", "dir", None), ("cp1/dump.log", "link", "/etc/passwd"), ("diff", "dir", None)),
     "dump.log is not a regular file"),
])
def test_container_stream_with_links_is_refused(tmp_path, stream, message):
    staging, checkpoints, upper = container_dirs(tmp_path)
    r = unpack(UNPACK_CONTAINER, stream, str(staging), str(checkpoints), "cp1", str(upper))
    assert r.returncode == 3
    assert message in r.stderr.decode()
    assert not staging.exists() and not (checkpoints / "cp1").exists()
    assert list(upper.iterdir()) == []


def test_holder_does_not_write_its_pid_file_through_a_link(tmp_path):
    # The holder runs as on a host (root, new PID and mount namespaces);
    # `true` stands in for criu, which it must never start here.
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    pidfile = tmp_path / "holder.pid"
    (tmp_path / "holder.pid.tmp").symlink_to(victim)
    r = subprocess.run(["python3", "-c", criu.HOLDER, str(pidfile), "true"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
    assert "File exists" in r.stderr or "Too many levels" in r.stderr
    assert victim.read_text() == "untouched"
    assert not pidfile.exists()


def test_a_full_disk_is_said_in_whole_lines(tmp_path):
    # A transfer onto a target whose disk filled up: tar says so once per
    # file, and the run's error, cut at 300 characters, began "t on device".
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "criuweb-test-small", str(small)], check=True)
    try:
        (small / "run").mkdir()
        stream = tar_of(*[(f"pages-{i}.img", "file", b"x" * 40_000) for i in range(12)])
        result = unpack(UNPACK_IMAGES, stream, str(small / "run"))
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert result.returncode != 0
    said = last_lines(result.stderr.decode())
    assert len(result.stderr.decode().strip()) > 300, "too little output to cut"
    assert "No space left on device" in said
    assert all(line.startswith("tar: ") for line in said.splitlines()), said
    assert len(said) <= 300
