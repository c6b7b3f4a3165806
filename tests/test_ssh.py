import socket
import threading

import pytest

from migrations_app import ssh
from migrations_app.models import Host

HOSTILE = ["a; rm -rf /", "$(touch /tmp/pwned)", "`id`", "it's", 'say "hi"', "x\ny", "*", "-n"]


@pytest.mark.lab
def test_hostile_values_reach_the_remote_program_verbatim(hosts):
    with ssh.Connection(hosts[0]) as conn:
        out = conn.run(["printf", "%s\\0", *HOSTILE]).stdout
        assert out.split("\0")[:-1] == HOSTILE
        # sh() passes values as positional parameters, never into the script.
        assert conn.sh('printf "%s" "$1"', "a; rm -rf /").stdout == "a; rm -rf /"


@pytest.mark.lab
def test_failed_command_names_host_and_exit_status(hosts):
    with ssh.Connection(hosts[0]) as conn:
        with pytest.raises(ssh.SSHError, match=r"^lab-1: `sh -c 'echo oops >&2; exit 3'` exited with 3: oops$"):
            conn.run(["sh", "-c", "echo oops >&2; exit 3"])


@pytest.mark.lab
def test_fetched_host_key_is_the_pinned_one(hosts):
    host = hosts[0]
    assert ssh.fetch_host_key(host.address, host.ssh_port) == host.host_key
    assert ssh.fingerprint(host.host_key).startswith("SHA256:")


@pytest.mark.lab
def test_a_different_host_key_is_refused(hosts):
    lab1, lab2 = hosts
    impostor = Host(name="impostor", address=lab1.address, user=lab1.user, key_path=lab1.key_path,
                    host_key=lab2.host_key)
    with pytest.raises(ssh.SSHError, match="impostor: the host key changed"):
        ssh.Connection(impostor).__enter__()


def test_no_pinned_key_no_connection(db):
    host = Host(name="new", address="127.0.0.1", key_path="/nonexistent")
    with pytest.raises(ssh.SSHError, match="new: no host key pinned"):
        ssh.open_client(host)


def test_unreachable_host_says_so(db, key_file):
    # Port 9 on loopback: nothing listens there, so the connect is refused.
    host = Host(name="gone", address="127.0.0.1", ssh_port=9, key_path=key_file,
                host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
    with pytest.raises(ssh.SSHError, match=r"^gone: cannot reach 127.0.0.1:9"):
        ssh.open_client(host)


def test_known_hosts_spelling_of_ports():
    assert ssh.known_hosts_name("10.0.0.1", 22) == "10.0.0.1"
    assert ssh.known_hosts_name("10.0.0.1", 2222) == "[10.0.0.1]:2222"


def test_malformed_host_key_is_a_clear_error():
    with pytest.raises(ssh.SSHError, match="is not '<type> <base64>'"):
        ssh.parse_host_key("garbage")


@pytest.mark.lab
def test_stream_counts_bytes_between_hosts(hosts):
    with ssh.Connection(hosts[0]) as a, ssh.Connection(hosts[1]) as b:
        seen = []
        src = a.open_command(["head", "-c", "3000000", "/dev/zero"])
        dst = b.open_command(["wc", "-c"])
        total, src_rc, dst_rc, _, _ = ssh.stream(src, dst, seen.append)
        assert (total, src_rc, dst_rc) == (3_000_000, 0, 0)
        assert seen[-1] == 3_000_000 and seen == sorted(seen)


@pytest.mark.lab
def test_a_stalled_stream_fails_instead_of_hanging(hosts):
    with ssh.Connection(hosts[0]) as a, ssh.Connection(hosts[1]) as b:
        src = a.open_command(["head", "-c", "50000000", "/dev/zero"], idle_timeout=1)
        # A target that never reads: the SSH window fills and writes stall.
        dst = b.open_command(["sleep", "30"], idle_timeout=1)
        with pytest.raises(ssh.SSHError, match=r"the transfer stalled after \d+ bytes"):
            ssh.stream(src, dst)
        src.close()
        dst.close()


@pytest.mark.lab
def test_a_stream_past_paramikos_rekey_limit_goes_through(hosts):
    """Paramiko starts a key exchange after 512 MiB each way; started by the
    client in the middle of a stream, it can time out ("Key-exchange timed
    out waiting for key negotiation", paramiko#822; seen here moving a
    512 MiB container). Our connections leave re-keying to sshd, which
    handles it in stride."""
    size = 3 * 2**29 + 12345  # past the limit three times, each way
    with ssh.Connection(hosts[0]) as a, ssh.Connection(hosts[1]) as b:
        for conn in (a, b):
            assert conn.client.get_transport().packetizer.REKEY_BYTES >= 2**40
        src = a.open_command(["head", "-c", str(size), "/dev/zero"])
        dst = b.open_command(["wc", "-c"])
        total, src_rc, dst_rc, _, _ = ssh.stream(src, dst, lambda n: None)
        assert (total, src_rc, dst_rc) == (size, 0, 0)


@pytest.mark.lab
def test_a_stream_whose_source_connection_breaks_blames_the_source_and_spares_the_target(hosts):
    """The source's connection breaks mid-stream so that paramiko's window
    adjust, sent from inside src.recv(), fails: EOFError from the source's
    transport. Before the fix stream() closed the target's transport for it:
    the target, healthy, read as the lost connection, and the run's target
    connection was gone for its rollback."""
    with ssh.Connection(hosts[0]) as a, ssh.Connection(hosts[1]) as b:
        src = a.open_command(["head", "-c", "2000000000", "/dev/zero"])
        dst = b.open_command(["wc", "-c"])
        broken = threading.Event()

        def progress(n):
            if n > 5_000_000 and not broken.is_set():
                broken.set()
                # Our side of the source's socket shut for writing (a real
                # socket failure): the next packet paramiko sends on it, the
                # window adjust inside src.recv(), fails with EPIPE.
                a.client.get_transport().sock.shutdown(socket.SHUT_WR)

        total, src_rc, dst_rc, _, _ = ssh.stream(src, dst, progress)
        assert broken.is_set() and total < 2_000_000_000
        assert src_rc != 0 and ssh.channel_lost(src)
        assert not ssh.channel_lost(dst)
        assert not b.lost()
        assert b.run(["true"]).rc == 0
