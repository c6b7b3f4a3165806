"""Pre-flight's lookup of Docker's init (--init) finds it where dockerd does.

The script runs in a real sh, here rather than over SSH: it only reads the
directories it is given, and the lab's hosts share this machine's disk, so
a docker-init placed in their /usr/libexec/docker would change what every
other session's dockerd sees.
"""

import os
import subprocess

from migrations_app.engine.container_checks import INIT_DIRS, LOOKUP_INIT_SCRIPT, init_dirs


def lookup(binary, dirs, path):
    env = {"PATH": os.pathsep.join(str(p) for p in path)}
    argv = ["/bin/sh", "-c", LOOKUP_INIT_SCRIPT, "sh", binary, *map(str, dirs)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.strip()


def executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_docker_init_in_libexec_and_not_in_path_is_found(tmp_path):
    # Fedora's and Arch's packages: /usr/libexec/docker/docker-init, in no
    # user's PATH. `command -v` alone found nothing and every --init
    # container was refused as "not found".
    libexec = tmp_path / "usr/libexec/docker"
    found = executable(libexec / "docker-init")
    assert lookup("docker-init", [tmp_path / "usr/local/libexec/docker", libexec], [tmp_path / "bin"]) == found


def test_libexec_comes_before_path_as_in_dockerd(tmp_path):
    libexec = executable(tmp_path / "libexec/docker/docker-init")
    executable(tmp_path / "bin/docker-init")
    assert lookup("docker-init", [tmp_path / "libexec/docker"], [tmp_path / "bin"]) == libexec


def test_path_when_no_libexec_has_it_and_nothing_when_none_has(tmp_path):
    (tmp_path / "libexec/docker").mkdir(parents=True)
    # Not executable: dockerd's exec.LookPath skips it too.
    (tmp_path / "libexec/docker/docker-init").write_text("")
    in_path = executable(tmp_path / "bin/docker-init")
    assert lookup("docker-init", [tmp_path / "libexec/docker"], [tmp_path / "bin"]) == in_path
    assert lookup("docker-init", [tmp_path / "libexec/docker"], [tmp_path / "empty"]) == ""


def test_a_configured_absolute_init_path_is_taken_as_it_is(tmp_path):
    executable(tmp_path / "libexec/docker/tini")
    assert lookup("/opt/tini", [tmp_path / "libexec/docker"], [tmp_path / "bin"]) == "/opt/tini"


def test_the_directories_are_moby_s():
    assert INIT_DIRS[:2] == ("/usr/local/libexec/docker", "/usr/libexec/docker")
    assert "/usr/lib/docker" in init_dirs("tini")
    assert init_dirs("docker-init")[-2:] == ("/usr/local/libexec", "/usr/libexec")
    assert "/usr/libexec" not in init_dirs("tini")
