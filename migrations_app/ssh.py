"""SSH to a managed host, with its pinned host key and nothing else trusted.

Every command is given as an argv list and joined with shlex.join, so no
value ever reaches the remote shell unquoted.
"""

import base64
import hashlib
import io
import itertools
import logging
import os
import shlex
import socket
import stat
import threading
import time
from dataclasses import dataclass

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from django.conf import settings

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# No private key file is anywhere near this; a larger file is not one.
KEY_FILE_MAX = 64 * 1024


def stream_idle_timeout() -> int:
    """Seconds a stream may move no byte before it fails (CRIUWEB_STREAM_IDLE_TIMEOUT)."""
    return settings.STREAM_IDLE_TIMEOUT


class SSHError(Exception):
    """An SSH connection or remote command failed; the message names the host."""


class ConnectionLost(SSHError):
    """The SSH connection to a host broke while something ran over it (its sshd died, the network went).

    The message is for people: the host and what was under way. What paramiko
    or the socket said is kept in `detail`, for the run's log: "Socket is
    closed" or "EOFError" tell a reader nothing about which host went.
    """

    def __init__(self, host: str, what: str = "", detail: str = ""):
        self.host = host
        self.what = what
        self.detail = detail
        super().__init__(f"{host}: the SSH connection was lost" + (f" ({what})" if what else ""))


# What paramiko and the socket under it raise when a connection goes away
# mid-call: paramiko's own errors, EOFError from its packetizer, and
# OSError("Socket is closed") from a channel whose transport is gone.
TRANSPORT_ERRORS = (paramiko.SSHException, EOFError, OSError)


def connection_lost(error: BaseException | None) -> ConnectionLost | None:
    """The ConnectionLost behind error, if a lost SSH connection is its cause.

    Follows explicit causes (`raise ... from`) only: an error raised while
    handling a lost connection, for a reason of its own, is not one.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConnectionLost):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def channel_lost(chan) -> bool:
    """True when the channel's SSH connection is gone (not merely the command on it ended)."""
    transport = chan.get_transport()
    return transport is None or not transport.is_active()


def _said(error: BaseException) -> str:
    """What an exception said, with its type: the detail for the log."""
    return f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__


@dataclass
class Result:
    argv: list
    rc: int
    stdout: str
    stderr: str


def known_hosts_name(address, port):
    # known_hosts spells non-default ports as "[addr]:port".
    return address if port == 22 else f"[{address}]:{port}"


def parse_host_key(text):
    """Turn '<type> <base64> [comment]' into a paramiko key, or raise SSHError."""
    parts = text.split()
    if len(parts) < 2:
        raise SSHError(f"host key {text!r} is not '<type> <base64>'")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as e:
        raise SSHError(f"host key {text!r} cannot be read: {e}") from e


def fingerprint(key_text):
    """SHA256 fingerprint as ssh-keygen -l prints it ("not a valid key" for garbage)."""
    try:
        raw = base64.b64decode(key_text.split()[1], validate=True)
    except (IndexError, ValueError):
        return "not a valid key"
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def key_dirs():
    """The directories private keys may be read from, as real paths."""
    return [os.path.realpath(d) for d in settings.SSH_KEY_DIRS]


def key_file_path(value):
    """The absolute path a host's key_path names: relative names are in the key directory."""
    return os.path.normpath(os.path.join(settings.SSH_KEY_DIR, value))


def load_private_key(value):
    """The private key at key_path `value`, read only from inside the key directories.

    Raises SSHError with a message for the person who typed the path. A path
    outside the directories gets the same answer whether or not a file is
    there, so the check tells nothing about the rest of the server's files;
    it is made on the real path, so a symlink in the key directory cannot
    point out of it. The bytes are read once here and handed to paramiko,
    so a file swapped after the check is never read.
    """
    if not value:
        raise SSHError("No private key file is set")
    path = key_file_path(value)
    real = os.path.realpath(path)
    dirs = key_dirs()
    if not any(real != d and os.path.commonpath([real, d]) == d for d in dirs):
        raise SSHError(
            f"The key file {value} is outside the key directory ({', '.join(map(str, settings.SSH_KEY_DIRS))}); "
            "criuweb reads private keys only from there"
        )
    try:
        # O_NOFOLLOW: the real path has no symlink left, unless one was put there since.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SSHError(f"There is no key file {value} in the key directory") from None
    except OSError as e:
        raise SSHError(f"The key file {value} cannot be read by the server ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SSHError(f"The key file {value} is not a regular file")
        data = os.read(fd, KEY_FILE_MAX + 1)
    finally:
        os.close(fd)
    return _parse_private_key(value, data)


def _parse_private_key(value, data):
    unusable = (
        f"The key file {value} is not a private key criuweb can use "
        "(OpenSSH or PEM format; Ed25519, ECDSA or RSA; without a passphrase)"
    )
    if len(data) > KEY_FILE_MAX:
        raise SSHError(unusable)
    try:
        try:
            loaded = serialization.load_ssh_private_key(data, password=None)
        except ValueError:
            loaded = serialization.load_pem_private_key(data, password=None)
        kind = {
            rsa.RSAPrivateKey: paramiko.RSAKey,
            ed25519.Ed25519PrivateKey: paramiko.Ed25519Key,
            ec.EllipticCurvePrivateKey: paramiko.ECDSAKey,
        }
        key_class = next((k for base, k in kind.items() if isinstance(loaded, base)), None)
        if key_class is None:
            raise SSHError(unusable)
        return key_class.from_private_key(io.StringIO(data.decode("ascii")))
    except TypeError:
        # cryptography's way of saying the key is encrypted and no password was given.
        raise SSHError(f"The key file {value} is protected by a passphrase; criuweb needs a key without one") from None
    except (ValueError, UnsupportedAlgorithm, paramiko.SSHException):
        # UnicodeDecodeError is a ValueError: a binary file is simply not a key.
        raise SSHError(unusable) from None


def fetch_host_key(address, port, timeout=None):
    """Ask a server for its host key without logging in, to show it for pinning.

    The errors say only whether a TCP connection was made: echoing what a
    non-SSH service answered (paramiko quotes its banner) would turn this
    page into a probe of any address's services. The detail goes to the log.
    """
    timeout = timeout or settings.SSH_CONNECT_TIMEOUT
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        log.info("host key of %s:%s: connect failed: %s", address, port, e)
        raise SSHError(f"{address}:{port}: cannot connect (no answer, or the connection was refused)") from None
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    except Exception as e:  # paramiko raises SSHException, EOFError, OSError, ValueError... on junk
        log.info("host key of %s:%s: handshake failed: %r", address, port, e)
        raise SSHError(f"{address}:{port}: no SSH server answered (the SSH handshake failed)") from None
    finally:
        transport.close()


class Connection:
    """One SSH connection to a host; use as a context manager."""

    def __init__(self, host, connect_timeout=None):
        self.host = host
        self.name = host.name
        self.client = None
        # A rollback reaching a host that may be what failed waits less
        # than the configured connect timeout.
        self.connect_timeout = connect_timeout

    def __enter__(self):
        self.client = open_client(self.host, self.connect_timeout)
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.client:
            self.client.close()
            self.client = None

    def lost(self) -> bool:
        """True when this connection was made and its transport has gone away since."""
        client = self.client
        if client is None:
            return False
        transport = client.get_transport()
        return transport is None or not transport.is_active()

    def lost_error(self, what: str, error: BaseException | None = None, detail: str = "") -> ConnectionLost:
        """The ConnectionLost for this host, logged with what paramiko said."""
        detail = detail or (_said(error) if error is not None else "")
        log.warning("%s: SSH connection lost (%s): %s", self.name, what, detail)
        return ConnectionLost(self.name, what, detail)

    def interrupt(self):
        """Close the connection under whatever call is blocked on it, from another thread.

        The blocked call then fails at once (its channel reads EOF, its exit
        status is -1): how a freeze limit ends a call that never answers.
        """
        client = self.client
        if client:
            client.close()

    def run(self, argv, check=True, timeout=120, input=None):
        """Run argv on the host and return its Result; raise SSHError on rc != 0 if check."""
        command = shlex.join(str(a) for a in argv)
        rc, stdout, stderr = self._exec(argv, timeout, input)
        result = Result(list(argv), rc, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
        if check and rc != 0:
            detail = (result.stderr.strip() or result.stdout.strip())[-800:]
            raise SSHError(f"{self.name}: `{_short(command)}` exited with {rc}: {detail}")
        return result

    def _exec(self, argv, timeout, input):
        """(exit status, stdout bytes, stderr bytes) of argv on the host."""
        command = shlex.join(str(a) for a in argv)
        what = f"while `{_label(argv)}` ran"
        chan = self._session(timeout, what)
        try:
            chan.exec_command(command)
            if input is not None:
                chan.sendall(input if isinstance(input, bytes) else input.encode())
                chan.shutdown_write()
            stdout, stderr = _drain(chan, timeout, command, self.name)
            rc = chan.recv_exit_status()
        except TRANSPORT_ERRORS as e:
            if isinstance(e, EOFError) or self.lost() or channel_lost(chan):
                # EOFError: paramiko's packetizer found the socket closed.
                raise self.lost_error(what, e) from e
            raise
        finally:
            chan.close()
        if rc == -1 and channel_lost(chan):
            # No status because the connection went away (or was
            # interrupted): the command's outcome is unknown, not a failure.
            raise self.lost_error(what, detail="the channel closed without an exit status")
        return rc, stdout, stderr

    def sh(self, script, *args, **kwargs):
        """Run a constant sh script with positional arguments, never interpolated."""
        return self.run(["sh", "-c", script, "sh", *args], **kwargs)

    def read_file(self, path, check=True):
        result = self.run(["cat", "--", path], check=check)
        return result.stdout if result.rc == 0 else None

    def read_bytes(self, path):
        """Raw bytes of a remote file, or None if it is not there."""
        rc, out, _ = self._exec(["cat", "--", path], 60, None)
        return out if rc == 0 else None

    def open_command(self, argv, idle_timeout=None):
        """Start argv and return its channel, for streaming.

        A read or write that waits idle_timeout seconds raises: a stalled
        transfer must fail (and roll back) rather than keep a frozen
        workload frozen for ever.
        """
        command = shlex.join(str(a) for a in argv)
        what = f"starting `{_label(argv)}`"
        chan = self._session(idle_timeout or stream_idle_timeout(), what)
        try:
            chan.exec_command(command)
        except TRANSPORT_ERRORS as e:
            chan.close()
            if isinstance(e, EOFError) or self.lost() or channel_lost(chan):
                raise self.lost_error(what, e) from e
            raise
        return chan

    def _session(self, timeout, what):
        try:
            chan = self.client.get_transport().open_session(timeout=10)
        except paramiko.ChannelException as e:
            # The server refused a channel (MaxSessions): the connection itself is fine.
            raise SSHError(f"{self.name}: the SSH server refused a session ({e}) {what}") from e
        except (paramiko.SSHException, AttributeError, EOFError, OSError) as e:
            raise self.lost_error(what, e) from e
        if timeout:
            chan.settimeout(timeout)
        return chan


def open_client(host, timeout=None):
    """A connected paramiko client that trusts only the host's pinned key."""
    if not host.host_key:
        raise SSHError(f"{host.name}: no host key pinned; confirm its key first")
    key = parse_host_key(host.host_key)
    try:
        login_key = load_private_key(host.key_path)
    except SSHError as e:
        raise SSHError(f"{host.name}: {e}") from None
    client = paramiko.SSHClient()
    client.get_host_keys().add(known_hosts_name(host.address, host.ssh_port), key.get_name(), key)
    # RejectPolicy is paramiko's default; said again so nobody "fixes" it.
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            hostname=host.address,
            port=host.ssh_port,
            username=host.user,
            pkey=login_key,
            # Only the host's own key: never root's ~/.ssh keys or an agent's.
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout or settings.SSH_CONNECT_TIMEOUT,
            banner_timeout=timeout or settings.SSH_CONNECT_TIMEOUT,
            auth_timeout=timeout or settings.SSH_CONNECT_TIMEOUT,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        raise SSHError(
            f"{host.name}: the host key changed (now {fingerprint(f'{e.key.get_name()} {e.key.get_base64()}')},"
            f" pinned {fingerprint(host.host_key)}); refusing to connect"
        ) from e
    except paramiko.SSHException as e:
        client.close()
        if "not found in known_hosts" in str(e):
            raise SSHError(f"{host.name}: the server's host key does not match the pinned one") from e
        raise SSHError(f"{host.name}: SSH to {host.user}@{host.address}:{host.ssh_port} failed: {e}") from e
    except (OSError, EOFError) as e:
        client.close()
        log.info("%s: connecting to %s:%s: %s", host.name, host.address, host.ssh_port, _said(e))
        why = _why_unreachable(e)
        raise SSHError(f"{host.name}: cannot reach {host.address}:{host.ssh_port} over SSH ({why})") from e
    # Paramiko starts a key exchange itself after 512 MiB sent or received
    # (Packetizer.REKEY_BYTES). Started by the client in the middle of a
    # long stream it can time out, "Key-exchange timed out waiting for key
    # negotiation" (paramiko#822; seen here moving a 512 MiB container,
    # rolled back). Re-keying is left to the server: sshd starts it by its
    # RekeyLimit (by default after an amount set by the cipher), and
    # paramiko answers that without the race.
    packetizer = client.get_transport().packetizer
    packetizer.REKEY_BYTES = packetizer.REKEY_PACKETS = 2**40
    return client


def _why_unreachable(error: BaseException) -> str:
    """A connect failure in a few words: the socket's own reason, not paramiko's wrapping of it.

    paramiko raises NoValidConnectionsError ("[Errno None] Unable to connect
    to port 22 on ...") holding each address's real error.
    """
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError) and error.errors:
        error = next(iter(error.errors.values()))
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, EOFError):
        return "the server closed the connection"
    if isinstance(error, OSError) and error.strerror:
        # "Connection refused": nothing listens there (is sshd running?).
        return error.strerror[:1].lower() + error.strerror[1:]
    return str(error) or error.__class__.__name__


def _drain(chan, timeout, command, name):
    """Read stdout and stderr together; reading one alone can deadlock on the other."""
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        progressed = False
        while chan.recv_ready():
            out += chan.recv(CHUNK)
            progressed = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(CHUNK)
            progressed = True
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            # Data can still arrive between the checks; one last pass. A
            # closed channel (lost connection) sends nothing more.
            if chan.eof_received or chan.closed:
                break
        if deadline and time.monotonic() > deadline:
            raise SSHError(f"{name}: `{_short(command)}` did not finish in {timeout} s")
        if not progressed:
            time.sleep(0.005)
    return bytes(out), bytes(err)


def stream(src_chan, dst_chan, on_progress=None, keep_dst=False, limit=None):
    """Copy src's stdout into dst's stdin; return the byte count.

    The bytes pass through the controller's memory, never its disk.
    keep_dst: dst's stdin stays open and dst keeps running (it waits for more
    on stdin after the stream); its exit status comes back as 0 and its
    stderr is left unread, for its owner.
    limit: copy exactly this many bytes and leave src running (what it
    writes afterwards is for its owner); its exit status comes back as 0.
    """
    total = 0
    errs = {"src": bytearray(), "dst": bytearray()}

    def collect(chan, key):
        while True:
            try:
                data = chan.recv_stderr(CHUNK)
            except TimeoutError:
                # Quiet stderr is normal; the main loop judges stalls.
                if chan.closed or chan.exit_status_ready():
                    break
                continue
            if not data:
                break
            errs[key] += data

    # With a limit, src's stderr stays its owner's too.
    threads = [] if limit is not None else [threading.Thread(target=collect, args=(src_chan, "src"), daemon=True)]
    if not keep_dst:
        threads.append(threading.Thread(target=collect, args=(dst_chan, "dst"), daemon=True))
    for t in threads:
        t.start()
    # Which channel the call that failed was on: src.recv() sends too (the
    # SSH window adjust), so its connection breaking raises there as well.
    side = src_chan
    try:
        while limit is None or total < limit:
            side = src_chan
            data = src_chan.recv(CHUNK if limit is None else min(CHUNK, limit - total))
            if not data:
                break
            side = dst_chan
            dst_chan.sendall(data)
            total += len(data)
            if on_progress:
                on_progress(total)
        side = dst_chan
        if not keep_dst:
            dst_chan.shutdown_write()
    except TimeoutError as e:
        raise SSHError(f"the transfer stalled after {total} bytes (no data for {src_chan.gettimeout()} s)") from e
    except (OSError, EOFError, paramiko.SSHException) as e:
        if isinstance(e, (EOFError, paramiko.SSHException)):
            # paramiko's packetizer found that channel's socket gone: close
            # its transport now (that one only: the other host's connection
            # is fine, and a rollback needs it), so that channel_lost() says
            # so without waiting for paramiko's own thread to notice.
            _drop(side)
        # -1 when no status came (a lost connection): the caller tells that
        # apart with channel_lost(), rather than read a made-up 255.
        if side is src_chan:
            # The source's connection broke: the target's command gets the end
            # of its input and says what it made of a stream cut short.
            if not keep_dst:
                _quietly(dst_chan.shutdown_write)
            _quietly(src_chan.close)
            dst_rc = 0 if keep_dst else _exit_status(dst_chan)
            return total, -1, dst_rc, "", _errs_after(threads, errs, "dst")
        # The target closed its end (its command died): its exit status and
        # stderr say why, better than "Socket is closed". The source, now
        # unread, would block for ever: close it.
        _quietly(src_chan.close)
        return total, -1, _exit_status(dst_chan), "", _errs_after(threads, errs, "dst")
    # After the last byte the target may still be unpacking (a large layer).
    if limit is not None:
        src_rc = 0 if total == limit else -1
        return total, src_rc, 0, "" if src_rc == 0 else "the stream ended early", ""
    src_rc = _exit_status(src_chan)
    dst_rc = 0 if keep_dst else _exit_status(dst_chan, 10 * stream_idle_timeout())
    for t in threads:
        t.join(5)
    return total, src_rc, dst_rc, errs["src"].decode(errors="replace"), errs["dst"].decode(errors="replace")


def _drop(chan) -> None:
    transport = chan.get_transport()
    if transport is not None:
        transport.close()


def _quietly(call) -> None:
    """A channel call whose failure changes nothing: closing one on a broken connection raises EOFError."""
    try:
        call()
    except (OSError, EOFError, paramiko.SSHException):
        pass


def _errs_after(threads, errs, key):
    for t in threads:
        t.join(5)
    return errs[key].decode(errors="replace")


def _exit_status(chan, timeout=None):
    """A channel's exit status, waiting at most timeout seconds (-1 on time-out)."""
    if not chan.status_event.wait(timeout or stream_idle_timeout()):
        return -1
    return chan.recv_exit_status()


def _label(argv) -> str:
    """A command's first words, to name it in a message (a shell script's body would drown it)."""
    words = [str(a) for a in argv]
    if words[:1] == ["env"]:
        # `env VAR=... program`: the program is the name.
        words = list(itertools.dropwhile(lambda w: w == "env" or "=" in w, words)) or words
    if words[:2] == ["sh", "-c"]:
        return "sh -c ..."
    return _short(shlex.join(words[:3]) + (" ..." if len(words) > 3 else ""), 60)


def _short(command, limit=160):
    return command if len(command) <= limit else command[:limit] + "..."
