"""The throwaway certificates of a run: what CRIU's GnuTLS will check, checked here with OpenSSL."""

import io
import socket
import ssl
import tarfile
import threading

from cryptography import x509

from migrations_app.engine import tls


def _write(tmp_path, side, name):
    d = tmp_path / name
    d.mkdir()
    with tarfile.open(fileobj=io.BytesIO(side.tar())) as tar:
        members = tar.getmembers()
        tar.extractall(d, filter="data")
    return d, members


def test_both_certificates_name_the_address_and_chain_to_the_run_ca():
    server, client = tls.make_pair("10.213.1.12")
    ca = x509.load_pem_x509_certificate(server.cacert)
    assert server.cacert == client.cacert
    for side in (server, client):
        cert = x509.load_pem_x509_certificate(side.cert)
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        # CRIU checks both peers against the connection's address (criu/tls.c).
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.213.1.12"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_each_run_gets_its_own_ca():
    first, _ = tls.make_pair("127.0.0.1")
    second, _ = tls.make_pair("127.0.0.1")
    assert first.cacert != second.cacert and first.key != second.key


def test_files_are_private(tmp_path):
    server, _ = tls.make_pair("127.0.0.1")
    _, members = _write(tmp_path, server, "server")
    assert sorted(m.name for m in members) == ["cacert.pem", "cert.pem", "key.pem"]
    assert all(m.mode == 0o600 for m in members)
    assert tls.criu_args("/run/x/") == [
        "--tls", "--tls-cacert", "/run/x/cacert.pem", "--tls-cert", "/run/x/cert.pem", "--tls-key", "/run/x/key.pem",
    ]


def _handshake(tmp_path, server_side, client_side, address="127.0.0.1"):
    """A mutual-TLS handshake on loopback; the client's error, or None."""
    sd, _ = _write(tmp_path, server_side, "s")
    cd, _ = _write(tmp_path, client_side, "c")
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(sd / "cert.pem", sd / "key.pem")
    sctx.load_verify_locations(sd / "cacert.pem")
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_cert_chain(cd / "cert.pem", cd / "key.pem")
    cctx.load_verify_locations(cd / "cacert.pem")
    listener = socket.create_server((address, 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with sctx.wrap_socket(conn, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection((address, port)) as raw, cctx.wrap_socket(raw, server_hostname=address) as s:
            s.sendall(b"x")
        return None
    except ssl.SSLError as e:
        return e
    finally:
        t.join(5)
        listener.close()


def test_the_pair_completes_a_mutual_handshake(tmp_path):
    server, client = tls.make_pair("127.0.0.1")
    assert _handshake(tmp_path, server, client) is None


def test_a_certificate_of_another_run_is_refused(tmp_path):
    server, _ = tls.make_pair("127.0.0.1")
    _, stranger = tls.make_pair("127.0.0.1")
    # The stranger trusts another CA: it refuses this run's server.
    assert isinstance(_handshake(tmp_path, server, stranger), ssl.SSLCertVerificationError)


def test_a_certificate_for_another_address_is_refused(tmp_path):
    server, client = tls.make_pair("127.0.0.2")
    assert isinstance(_handshake(tmp_path, server, client), ssl.SSLCertVerificationError)
