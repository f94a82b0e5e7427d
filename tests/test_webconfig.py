"""--web.config.file with real TLS: a throwaway CA made with the openssl CLI, the real exporter
started as a subprocess on a loopback ephemeral port, and real TLS clients (ssl/http.client).

The exporter runs fine without systemd here: it serves its own metrics and reports the dbus
source down, which is all these tests need from /metrics.
"""

from __future__ import annotations

import base64
import http.client
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bcrypt
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.webconfig import BasicAuth, WebConfigError, load
from tests.processes import end

ROOT = Path(__file__).resolve().parents[1]
# Always in the exporter's own output: proves a response carried metrics.
METRIC = b"process_resident_memory_bytes"
REALM = 'Basic realm="systemd-memory-exporter"'
PASSWORD = "correct horse"
# Cost 4 (bcrypt's minimum) keeps the tests fast; the cost does not change the code path.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
HTPASSWD_HASH = "$2y$" + bcrypt.hashpw(b"from htpasswd", bcrypt.gensalt(rounds=4)).decode()[4:]


# --- a throwaway PKI --------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(d: Path, name: str, ca: str, san: str, usage: str, sections: str = "") -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    # keyUsage and authorityKeyIdentifier: Python 3.13's clients verify strictly (VERIFY_X509_STRICT).
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                                   "keyUsage=critical,digitalSignature\nauthorityKeyIdentifier=keyid,issuer\n" + sections)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca signs server (127.0.0.1, localhost) and client (scraper.example); rogue-ca signs rogue."""
    assert shutil.which("openssl"), "the openssl command is needed to make test certificates (apt-get install openssl)"
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN={ca}", "-days", "2",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _issue(d, "server", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth")
    _issue(d, "client", "ca", "DNS:scraper.example", "clientAuth")
    _issue(d, "rogue", "rogue-ca", "DNS:scraper.example", "clientAuth")
    # A directory name among the SANs: getpeercert() gives it as a tuple of RDNs, not a string.
    _issue(d, "dirname", "ca", "DNS:scraper.example,dirName:dir_sect", "clientAuth", "[dir_sect]\nCN=scraper\n")
    _openssl("pkey", "-in", "server.key", "-aes128", "-passout", "pass:secret", "-out", "encrypted.key", cwd=d)
    return d


# --- the exporter and its clients -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Exporter:
    def __init__(self, config: Path, proc: subprocess.Popen, port: int, stderr: Path):
        self.config, self.proc, self.port, self.stderr = config, proc, port, stderr

    def request(self, path="/metrics", *, tls=True, cert: str | None = None, auth: str | None = None,
                method="GET", ca="ca.crt") -> tuple[int, http.client.HTTPMessage, bytes]:
        if tls:
            ctx = ssl.create_default_context(cafile=str(self.config.parent / ca))
            if cert:
                ctx.load_cert_chain(self.config.parent / f"{cert}.crt", self.config.parent / f"{cert}.key")
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=15)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()


def _start(config: Path, stderr: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}", f"--web.config.file={config}",
         "--dbus.timeout=2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr.open("wb"),
    )
    return proc, port


@pytest.fixture
def exporter(tmp_path, pki):
    """exporter(yaml) -> a running Exporter with that web config (written next to the certs,
    so relative file names in it are tested too). Stopped, and its log checked, at the end."""
    started: list[Exporter] = []

    def start(yaml: str) -> Exporter:
        config = pki / f"web-{len(started)}-{tmp_path.name}.yml"
        config.write_text(textwrap.dedent(yaml))
        stderr = tmp_path / f"stderr-{len(started)}"
        proc, port = _start(config, stderr)
        started.append(Exporter(config, proc, port, stderr))
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"exporter exited with {proc.returncode}: {stderr.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return started[-1]
            except OSError:
                assert time.monotonic() < deadline, "exporter did not start listening"
                time.sleep(0.05)

    yield start
    for e in started:
        end(e.proc, timeout=10)
        # Refused clients must be handled, not crash a thread with a traceback.
        assert "Traceback" not in e.stderr.read_text(), e.stderr.read_text()


TLS = """
tls_server_config:
  cert_file: server.crt
  key_file: server.key
"""
MTLS = TLS + """\
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
"""
REFUSED = (ssl.SSLError, ConnectionError)  # TLS 1.3 reports a refused client cert on the first read


# --- TLS --------------------------------------------------------------------------------


def test_scrape_over_tls(exporter):
    e = exporter(TLS)
    status, _, body = e.request()
    assert status == 200 and METRIC in body
    status, _, body = e.request("/")
    assert status == 200 and b"systemd-memory-exporter" in body


def test_client_not_trusting_the_ca_is_refused(exporter):
    e = exporter(TLS)
    with pytest.raises(ssl.SSLCertVerificationError):
        e.request(ca="rogue-ca.crt")


def test_plain_http_to_tls_port_fails_cleanly_and_serving_goes_on(exporter):
    e = exporter(TLS)
    status, _, body = e.request(tls=False)
    assert status == 400 and b"HTTPS" in body and METRIC not in body
    status, _, body = e.request()
    assert status == 200 and METRIC in body


def test_stalled_handshake_does_not_block_other_clients(exporter):
    e = exporter(TLS)
    # Connected but silent: its handshake waits in its own thread, not in the accept loop.
    with socket.create_connection(("127.0.0.1", e.port)) as silent:
        started = time.monotonic()
        status, _, body = e.request()
        assert status == 200 and METRIC in body
        assert time.monotonic() - started < 5
        silent.sendall(b"\x16\x03\x01\x00")  # half a ClientHello, then gone


def test_min_version_tls13_refuses_a_tls12_client(exporter):
    e = exporter(TLS + "  min_version: TLS13\n")
    ctx = ssl.create_default_context(cafile=str(e.config.parent / "ca.crt"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", e.port), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    assert e.request()[0] == 200


def test_inline_pem(exporter, pki):
    """cert, key and client_ca given inline instead of as files."""
    def block(name: str) -> str:
        return textwrap.indent((pki / name).read_text(), "    ")

    e = exporter(
        "tls_server_config:\n"
        f"  cert: |\n{block('server.crt')}  key: |\n{block('server.key')}"
        f"  client_ca: |\n{block('ca.crt')}  client_auth_type: RequireAndVerifyClientCert\n"
    )
    assert e.request(cert="client")[0] == 200
    with pytest.raises(REFUSED):
        e.request()


# --- basic auth -------------------------------------------------------------------------


AUTH = f"""
basic_auth_users:
  prometheus: {HASH}
  alice: {HTPASSWD_HASH}
http_server_config:
  headers:
    X-Content-Type-Options: nosniff
"""


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-http"])
def test_basic_auth(exporter, tls):
    e = exporter((TLS if tls else "") + AUTH)
    for path in ("/metrics", "/", "/nonexistent"):
        for auth in (None, "prometheus:wrong", "prometheus:", "nobody:" + PASSWORD, "prometheus" + PASSWORD):
            status, headers, body = e.request(path, tls=tls, auth=auth)
            assert status == 401, (path, auth)
            assert headers["WWW-Authenticate"] == REALM
            assert METRIC not in body and b"<table>" not in body
            assert headers["X-Content-Type-Options"] == "nosniff"
    for _ in range(2):  # the second one is answered from the cache
        status, headers, body = e.request(tls=tls, auth="prometheus:" + PASSWORD)
        assert status == 200 and METRIC in body
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert e.request(tls=tls, auth="alice:from htpasswd")[0] == 200
    assert e.request(tls=tls, auth="prometheus:" + PASSWORD, method="HEAD")[0] == 200
    assert e.request(tls=tls, method="HEAD")[0] == 401
    # A verified password does not open the door to a wrong one afterwards.
    assert e.request(tls=tls, auth="prometheus:wrong")[0] == 401


def test_verified_passwords_are_cached_and_failures_are_not(monkeypatch):
    auth = BasicAuth({b"u": HASH.encode()})
    calls = []
    real = auth._bcrypt.checkpw
    monkeypatch.setattr(auth, "_bcrypt", type("B", (), {"checkpw": staticmethod(lambda p, h: calls.append(p) or real(p, h))}))
    header = "Basic " + base64.b64encode(b"u:" + PASSWORD.encode()).decode()
    assert auth.check(header) and auth.check(header) and len(calls) == 1
    wrong = "Basic " + base64.b64encode(b"u:nope").decode()
    assert not auth.check(wrong) and not auth.check(wrong) and len(calls) == 3
    assert auth.check(header) and len(calls) == 3
    # unknown users cost one bcrypt too (against a decoy hash), and never pass
    assert not auth.check("Basic " + base64.b64encode(b"x:" + PASSWORD.encode()).decode()) and len(calls) == 4
    for junk in (None, "", "Basic", "Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"no-colon").decode()):
        assert not auth.check(junk)


# --- client certificates ----------------------------------------------------------------


def test_client_certificate_required(exporter):
    e = exporter(MTLS)
    with pytest.raises(REFUSED):
        e.request()
    with pytest.raises(REFUSED):
        e.request(cert="rogue")  # right name, wrong CA
    status, _, body = e.request(cert="client")
    assert status == 200 and METRIC in body


@pytest.mark.parametrize("sans,cert,ok", [(["scraper.example"], "client", True),
                                          (["other.example", "127.0.0.2"], "client", False),
                                          (["scraper.example"], "dirname", True),
                                          (["other.example"], "dirname", False)])
def test_client_allowed_sans(exporter, sans, cert, ok):
    e = exporter(MTLS + f"  client_allowed_sans: {sans}\n")
    if ok:
        assert e.request(cert=cert)[0] == 200
    else:
        with pytest.raises(REFUSED):
            e.request(cert=cert)
    assert "Traceback" not in e.stderr.read_text()


def test_client_certificate_if_given(exporter):
    e = exporter(MTLS.replace("RequireAndVerifyClientCert", "VerifyClientCertIfGiven"))
    assert e.request()[0] == 200
    assert e.request(cert="client")[0] == 200
    with pytest.raises(REFUSED):
        e.request(cert="rogue")


# --- refused at start -------------------------------------------------------------------


BAD_CONFIGS = {
    "malformed-yaml": ("tls_server_config: [cert_file: x\n", "invalid YAML"),
    "not-a-mapping": ("- just\n- a list\n", "the file must be a mapping"),
    "unknown-top-key": ("basic_auth_user:\n  u: x\n", "unknown key 'basic_auth_user'"),
    "unknown-tls-key": (TLS + "  certfile: server.crt\n", "unknown key 'certfile'"),
    "duplicate-key": (TLS + "  key_file: server.key\n", "duplicate key 'key_file'"),
    "missing-cert": (TLS.replace("server.crt", "missing.crt"), "missing.crt: No such file or directory"),
    "cert-is-a-directory": (TLS.replace("server.crt", "."), "Is a directory"),
    "not-pem": (TLS.replace("server.crt", "server.ext"), "cannot use certificate"),
    "key-of-another-cert": (TLS.replace("server.key", "client.key"), "cannot use certificate"),
    "encrypted-key": (TLS.replace("server.key", "encrypted.key"), "is encrypted"),
    "no-key": ("tls_server_config:\n  cert_file: server.crt\n", "missing key_file"),
    "bad-hash": ("basic_auth_users:\n  prometheus: plaintext-password\n", "not a bcrypt hash"),
    "numeric-user": (f"basic_auth_users:\n  123: {HASH}\n", "user name 123"),
    "any-client-cert": (TLS + "  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n", "not supported"),
    "bad-client-auth": (TLS + "  client_auth_type: Sometimes\n", "choose from NoClientCert"),
    "verify-without-ca": (TLS + "  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
    "ca-without-verify": (TLS + "  client_ca_file: ca.crt\n", "never checks client certificates"),
    "missing-ca": (MTLS.replace("client_ca_file: ca.crt", "client_ca_file: nope.crt"), "nope.crt"),
    "bad-version": (TLS + "  min_version: TLS14\n", "min_version: 'TLS14'"),
    "versions-crossed": (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "min_version is above max_version"),
    "go-ciphers": (TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "cipher_suites is not supported"),
    "rate-limit": ("rate_limit:\n  interval: 1s\n  burst: 5\n", "rate_limit is not supported"),
    "bad-header": ("http_server_config:\n  headers:\n    X-Powered-By: me\n", "'X-Powered-By' cannot be set"),
    "bad-header-value": ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "choose from deny, sameorigin"),
    # Not Latin-1 (curly quotes): accepted once, it broke every response in encoding.
    "header-not-ascii": ("http_server_config:\n  headers:\n    Content-Security-Policy: default-src \u2018self\u2019\n",
                         "must be one line of printable ASCII"),
    "header-control-char": ('http_server_config:\n  headers:\n    Content-Security-Policy: "a\\0b"\n',
                            "must be one line of printable ASCII"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS) + ["missing-file"])
def test_bad_config_is_refused_at_start(pki, tmp_path, name):
    config = pki / f"bad-{name}.yml"
    if name == "missing-file":
        expected = "cannot read: No such file or directory"
    else:
        text, expected = BAD_CONFIGS[name]
        config.write_text(text)
    stderr = tmp_path / "stderr"
    proc, _ = _start(config, stderr)
    try:
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    message = stderr.read_text()
    assert rc == 1, message
    assert f"--web.config.file: {config}: " in message and expected in message, message
    assert "Traceback" not in message and message.count("\n") == 1, message


_KEYS = ["tls_server_config", "http_server_config", "basic_auth_users", "cert_file", "key_file", "cert", "key",
         "client_ca_file", "client_auth_type", "min_version", "client_allowed_sans", "headers", "http2",
         "X-Frame-Options", "prometheus", "rate_limit"]
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["server.crt", "server.key", "ca.crt", "TLS13", "RequireAndVerifyClientCert", "deny", HASH]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_VALUES)
def test_any_document_loads_or_is_refused_cleanly(pki, document):
    """Whatever the YAML holds, load() succeeds or raises WebConfigError: never a traceback."""
    config = pki / "fuzz.yml"
    config.write_text(yaml.safe_dump(document))
    try:
        load(str(config))
    except WebConfigError as e:
        assert str(e).startswith(f"{config}: ")


@pytest.mark.parametrize("text", ["? [a, b]\n: c\n", "a: &x 1\nb: *x\n<<: {c: 1}\n", "\tbad", "a: !!python/object:os.system x\n"])
def test_odd_yaml_is_refused_cleanly(pki, text):
    config = pki / "odd.yml"
    config.write_text(text)
    with pytest.raises(WebConfigError):
        load(str(config))


# --- optional dependencies --------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_runs_without_yaml_and_bcrypt():
    """Debian hosts without python3-yaml/python3-bcrypt: only --web.config.file needs them."""
    result = _python(
        "import sys; sys.modules['yaml'] = sys.modules['bcrypt'] = None\n"
        "from exporter.cli import build_parsers\n"
        "import exporter.web, exporter.webconfig\n"
        "build_parsers()[0].parse_args([])\n"
    )
    assert result.returncode == 0, result.stderr


def test_missing_bcrypt_is_a_clear_refusal(pki):
    config = pki / "auth-only.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: {HASH}\n")
    result = _python(
        "import sys; sys.modules['bcrypt'] = None\n"
        "from exporter.cli import main\n"
        f"sys.exit(main(['--web.listen-address=127.0.0.1:{_free_port()}', '--web.config.file={config}']))\n"
    )
    assert result.returncode == 1 and "needs the Python package bcrypt" in result.stderr, result.stderr
    assert "python3-bcrypt" in result.stderr and "systemd-memory-exporter[webconfig]" in result.stderr


def test_missing_pyyaml_is_a_clear_refusal(pki):
    """`pip install .` has neither (they are the webconfig extra): the message says how to get them."""
    config = pki / "tls-only.yml"
    config.write_text(TLS)
    result = _python(
        "import sys; sys.modules['yaml'] = None\n"
        "from exporter.cli import main\n"
        f"sys.exit(main(['--web.listen-address=127.0.0.1:{_free_port()}', '--web.config.file={config}']))\n"
    )
    assert result.returncode == 1, result.stderr
    assert f"--web.config.file: {config}: --web.config.file needs the Python package pyyaml" in result.stderr
    assert "apt install python3-yaml python3-bcrypt" in result.stderr
    assert "pip install 'systemd-memory-exporter[webconfig]'" in result.stderr and "Traceback" not in result.stderr


# --- reload (SIGHUP, the unit's ExecReload) -----------------------------------------------


def _served_certificate(e: Exporter) -> bytes:
    ctx = ssl.create_default_context(cafile=str(e.config.parent / "ca.crt"))
    with socket.create_connection(("127.0.0.1", e.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _reload_and_wait(e: Exporter, log_line: str) -> str:
    """SIGHUP, then wait until the exporter logged one more ``log_line``; returns that line."""
    before = e.stderr.read_text().count(log_line)
    e.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while True:
        lines = [line for line in e.stderr.read_text().splitlines() if log_line in line]
        if len(lines) > before:
            return lines[-1]
        assert e.proc.poll() is None, f"exporter exited on SIGHUP: {e.stderr.read_text()}"
        assert time.monotonic() < deadline, f"no {log_line!r} within 20 s:\n{e.stderr.read_text()}"
        time.sleep(0.05)


def _gauge(e: Exporter, name: str, auth: str) -> float:
    status, _, body = e.request(auth=auth)
    assert status == 200
    (value,) = [line.split()[1] for line in body.decode().splitlines() if line.startswith(name + " ")]
    return float(value)


RELOADED = "reloaded --web.config.file"
REFUSED_RELOAD = "reload of --web.config.file failed, keeping the config in force"


def test_reload_rotates_the_certificate_and_the_password(exporter, pki, tmp_path):
    """A renewed certificate (new key, same paths, as certbot renews) and a changed password take
    effect on SIGHUP, without a restart; a file that cannot be used keeps the old config."""
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(pki / "server.crt", live / "tls.crt")
    shutil.copy(pki / "server.key", live / "tls.key")
    config = (f"tls_server_config:\n  cert_file: {live}/tls.crt\n  key_file: {live}/tls.key\n"
              "basic_auth_users:\n  prometheus: {hash}\n")
    e = exporter(config.format(hash=HASH))
    assert _served_certificate(e) == _der(pki / "server.crt")
    old_auth, new_auth = "prometheus:" + PASSWORD, "prometheus:battery staple"
    assert e.request(auth=old_auth)[0] == 200
    # A connection kept open across the reload: TLS cannot change under it, passwords do.
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    kept = http.client.HTTPSConnection("127.0.0.1", e.port, context=ctx, timeout=15)

    def kept_request(auth: str) -> int:
        kept.request("GET", "/metrics", headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
        response = kept.getresponse()
        response.read()
        return response.status

    try:
        assert kept_request(old_auth) == 200
        _issue(pki, "renewed", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth")
        shutil.copy(pki / "renewed.key", live / "tls.key")
        shutil.copy(pki / "renewed.crt", live / "tls.crt")
        new_hash = bcrypt.hashpw(b"battery staple", bcrypt.gensalt(rounds=4)).decode()
        e.config.write_text(config.format(hash=new_hash))
        assert e.request(auth=old_auth)[0] == 200, "changed before the reload"

        _reload_and_wait(e, RELOADED)
        assert _served_certificate(e) == _der(pki / "renewed.crt") != _der(pki / "server.crt")
        assert e.request(auth=old_auth)[0] == 401
        status, _, body = e.request(auth=new_auth)
        assert status == 200 and METRIC in body
        assert kept_request(old_auth) == 401 and kept_request(new_auth) == 200
        assert kept.sock.getpeercert(binary_form=True) == _der(pki / "server.crt")
    finally:
        kept.close()
    assert _gauge(e, "systemd_memory_exporter_web_config_last_reload_successful", new_auth) == 1

    # Half a rotation (a key that is not the certificate's), then a file that is not YAML:
    # each reload is refused with the reason, and the config in force stays.
    shutil.copy(pki / "client.key", live / "tls.key")
    line = _reload_and_wait(e, REFUSED_RELOAD)
    assert "cannot use certificate" in line and str(live / "tls.crt") in line, line
    e.config.write_text("basic_auth_users: [\n")
    line = _reload_and_wait(e, REFUSED_RELOAD)
    assert f"{e.config}: invalid YAML" in line, line
    assert _served_certificate(e) == _der(pki / "renewed.crt")
    assert e.request(auth=old_auth)[0] == 401
    assert e.request(auth=new_auth)[0] == 200
    assert _gauge(e, "systemd_memory_exporter_web_config_last_reload_successful", new_auth) == 0
    assert _gauge(e, "systemd_memory_exporter_web_config_reload_failures_total", new_auth) == 2

    # Fixed again: the next reload goes through.
    shutil.copy(pki / "renewed.key", live / "tls.key")
    e.config.write_text(config.format(hash=new_hash))
    _reload_and_wait(e, RELOADED)
    assert _gauge(e, "systemd_memory_exporter_web_config_last_reload_successful", new_auth) == 1


def test_reload_does_not_turn_tls_off(exporter, pki):
    """A file that lost its tls_server_config must not put credentials and metrics in the clear
    on a SIGHUP: the reload is refused and counted, and TLS stays."""
    e = exporter(TLS + AUTH)
    e.config.write_text(AUTH)
    line = _reload_and_wait(e, REFUSED_RELOAD)
    assert "a reload does not turn TLS off" in line, line
    assert e.request(auth="prometheus:" + PASSWORD)[0] == 200
    status, _, body = e.request(tls=False)
    assert status == 400 and b"HTTPS" in body
    assert _gauge(e, "systemd_memory_exporter_web_config_reload_failures_total", "prometheus:" + PASSWORD) == 1


def test_reload_can_turn_tls_on(exporter, pki):
    e = exporter(AUTH)
    assert e.request(tls=False, auth="prometheus:" + PASSWORD)[0] == 200
    e.config.write_text(TLS + AUTH)
    _reload_and_wait(e, RELOADED)
    assert e.request(auth="prometheus:" + PASSWORD)[0] == 200
    status, _, body = e.request(tls=False)
    assert status == 400 and b"HTTPS" in body


def test_sighup_without_a_web_config_keeps_serving(tmp_path):
    stderr = tmp_path / "stderr"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}", "--dbus.timeout=2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr.open("wb"))
    e = Exporter(tmp_path / "none.yml", proc, port, stderr)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.05)
        _reload_and_wait(e, "received SIGHUP: no --web.config.file, nothing to reload")
        status, _, body = e.request(tls=False)
        assert status == 200 and METRIC in body
    finally:
        proc.terminate()
        proc.wait(10)
