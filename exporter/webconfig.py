"""--web.config.file: TLS, client certificates, basic auth and extra response headers, in the
file format of the Prometheus exporter-toolkit (the web-config.yml node_exporter reads):
https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md

The file is read at start, where any problem refuses the start with a message naming the file,
and again on SIGHUP (`systemctl reload`): a renewed certificate applies to the connections
accepted after it and changed passwords to every request after it, as in the toolkit, which reads
its file per connection. A file that cannot be used on reload keeps the config in force and logs
why (and systemd_memory_exporter_web_config_last_reload_successful drops to 0).
pyyaml and bcrypt are imported only here, and only when a file is given, so the exporter runs
without them otherwise (they are the `webconfig` extra).

Differences from the toolkit, all refused at start rather than silently ignored:
  - cipher_suites, curve_preferences and rate_limit are not supported (Go names; no limiter);
  - RequireAnyClientCert is not supported: Python's ssl always verifies a certificate it
    asks for. RequestClientCert (ask, never check) behaves as NoClientCert, which is the same
    thing for an exporter that never looks at an unverified certificate;
  - verifying client certificates needs client_ca_file or client_ca (Go would fall back to
    the system's public CAs, which would admit any publicly issued certificate);
  - a non-empty tls_server_config without a certificate is an error, not plain HTTP.
http2 is accepted and ignored: the server speaks HTTP/1.1 only.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# client_auth_type -> (verify mode, needs a client CA). See the module docstring for the two
# that differ from Go.
_CLIENT_AUTH = {
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_NONE, False),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}
_TLS_KEYS = {
    "cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
    "client_allowed_sans", "min_version", "max_version", "prefer_server_cipher_suites",
}
# The toolkit's allowed headers, with the values it allows (None: any value).
_HEADERS = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_UNSUPPORTED = {
    "rate_limit": "rate_limit is not supported by systemd-memory-exporter",
    "cipher_suites": "cipher_suites is not supported (its values are Go cipher names); leave it out for OpenSSL's defaults",
    "curve_preferences": "curve_preferences is not supported (its values are Go curve names); leave it out",
}
_BCRYPT_HASH = re.compile(rb"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
# bcrypt uses only the first 72 bytes; Go and htpasswd truncate silently, bcrypt>=5 raises.
_BCRYPT_MAX_PASSWORD = 72
# Answer of Go's net/http to plain HTTP on a TLS port: scrapers show it instead of a reset.
_PLAIN_HTTP_ANSWER = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"


_INSTALL_HINT = (
    "Debian: apt install python3-yaml python3-bcrypt; pip: pip install 'systemd-memory-exporter[webconfig]'"
)


class WebConfigError(Exception):
    """The file cannot be used; the message names the file and the problem."""


@dataclass
class WebConfig:
    path: str
    tls: ssl.SSLContext | None = None
    allowed_sans: frozenset[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    auth: BasicAuth | None = None

    def handshake(self, raw: socket.socket, timeout: float) -> socket.socket | None:
        """TLS handshake of an accepted connection, run in that connection's thread so a client
        that stalls it cannot hold up accepting. Each connection is wrapped here, not the
        listening socket, so a reloaded certificate applies to the next connection.
        Returns the socket to serve on, or None when it was dropped (logged at debug)."""
        if self.tls is None:
            return raw
        try:
            sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except OSError as e:  # e.g. the client is already gone
            log.debug("TLS setup with %s failed: %s", _peer(raw), e)
            raw.close()
            return None
        if self._handshake(sock, timeout):
            return sock
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        return None

    def _handshake(self, sock: ssl.SSLSocket, timeout: float) -> bool:
        sock.settimeout(timeout)  # CPython bounds the whole handshake by it, not each read
        try:
            sock.do_handshake()
        except ssl.SSLError as e:
            if e.reason == "HTTP_REQUEST":
                try:  # the raw socket under the failed TLS layer
                    socket.socket.sendall(sock, _PLAIN_HTTP_ANSWER)
                except OSError:
                    pass
            log.debug("TLS handshake with %s failed: %s", _peer(sock), e)
            return False
        except OSError as e:  # timeouts, resets
            log.debug("TLS handshake with %s failed: %s", _peer(sock), e)
            return False
        if self.allowed_sans is not None and not _sans(sock.getpeercert()) & self.allowed_sans:
            log.debug("client certificate of %s has none of client_allowed_sans", _peer(sock))
            return False
        return True

    def authorized(self, authorization: str | None) -> bool:
        """Whether a request with this Authorization header may be served."""
        return self.auth is None or self.auth.check(authorization)


class BasicAuth:
    """basic_auth_users: checks with bcrypt, which is slow on purpose, so each user's last
    verified password is remembered (as a keyed digest, never the password itself)."""

    def __init__(self, users: dict[bytes, bytes]):
        import bcrypt

        self._bcrypt = bcrypt
        self._users = users
        # Unknown users are checked against this, so they cost what a wrong password costs:
        # response times do not reveal which user names exist.
        cost = max(int(_BCRYPT_HASH.fullmatch(h).group(1)) for h in users.values())
        self._decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, bytes] = {}  # user -> digest of (hash, password); one per user
        # One bcrypt at a time (as the toolkit does): a flood of wrong passwords takes one CPU.
        self._lock = threading.Lock()

    def check(self, authorization: str | None) -> bool:
        credentials = _parse_basic(authorization)
        if credentials is None:
            return False
        user, password = credentials
        password = password[:_BCRYPT_MAX_PASSWORD]
        hashed = self._users.get(user)
        known = hashed is not None
        hashed = hashed if known else self._decoy
        # Keyed with a per-process secret, so the digest says nothing about the password.
        digest = hmac.new(self._key, hashed + b"\0" + password, "sha256").digest()
        if known and hmac.compare_digest(self._verified.get(user, b""), digest):
            return True
        with self._lock:
            try:
                ok = self._bcrypt.checkpw(password, hashed)
            except ValueError:  # e.g. a NUL byte in the password
                ok = False
        if ok and known:
            self._verified[user] = digest
        return ok and known


class WebConfigFile:
    """The file given with --web.config.file and the config read from it last, which reload()
    replaces as a whole or not at all. Also a Prometheus collector of how reloads went."""

    def __init__(self, path: str):
        self.path = path
        self.config = load(path)  # WebConfigError: refused at start
        self.last_reload_ok = True
        self.reload_failures = 0
        self._lock = threading.Lock()  # two SIGHUPs in a row: applied in the order they came

    def reload(self, apply: Callable[[WebConfig], None]) -> bool:
        """Read the file again; if it is usable, hand the new config to ``apply``."""
        with self._lock:
            try:
                config = load(self.path)
                if self.config.tls is not None and config.tls is None:
                    # Credentials and metrics must not start going out in the clear on a SIGHUP;
                    # the toolkit decides TLS at start too (turning it on by a reload is fine).
                    raise WebConfigError(f"{self.path} has no tls_server_config, and a reload does not turn "
                                         "TLS off (restart for that)")
            except WebConfigError as e:
                self.last_reload_ok = False
                self.reload_failures += 1
                log.error("reload of --web.config.file failed, keeping the config in force: %s", e)
                return False
            self.config, self.last_reload_ok = config, True
            apply(config)
            log.info("reloaded --web.config.file %s: its TLS settings for new connections, its passwords and "
                     "headers for every request", self.path)
            return True

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "systemd_memory_exporter_web_config_last_reload_successful",
            "Whether the last reload (SIGHUP) of --web.config.file succeeded; 1 before any reload.",
            value=1 if self.last_reload_ok else 0,
        )
        yield CounterMetricFamily(
            "systemd_memory_exporter_web_config_reload_failures",
            "Reloads (SIGHUP) of --web.config.file refused because the file could not be used.",
            value=self.reload_failures,
        )


def load(path: str) -> WebConfig:
    """Read and check the whole file, certificates included. Raises WebConfigError."""
    try:
        import yaml
    except ImportError:
        raise WebConfigError(f"{path}: --web.config.file needs the Python package pyyaml ({_INSTALL_HINT})") from None
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise WebConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_strict_loader(yaml))
    except yaml.YAMLError as e:
        raise WebConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    data = {} if data is None else data
    _check_mapping(path, "the file", data, {"tls_server_config", "http_server_config", "basic_auth_users"})

    config = WebConfig(path)
    base = os.path.dirname(os.path.abspath(path))  # relative file names are relative to the file (as in the toolkit)
    tls = data.get("tls_server_config") or {}
    _check_mapping(path, "tls_server_config", tls, _TLS_KEYS)
    if tls:
        config.tls, config.allowed_sans = _tls_context(path, base, tls)
    http = data.get("http_server_config") or {}
    _check_mapping(path, "http_server_config", http, {"http2", "headers"})
    if "http2" in http and not isinstance(http["http2"], bool):
        raise WebConfigError(f"{path}: http_server_config.http2 must be true or false")
    config.headers = _headers(path, http.get("headers") or {})
    users = data.get("basic_auth_users") or {}
    if users:
        config.auth = _basic_auth(path, users)
    log.info(
        "web config %s: %s, %s", path, "TLS" if config.tls else "plain HTTP (no TLS)",
        f"basic auth for {len(users)} user(s)" if users else "no basic auth",
    )
    return config


def _strict_loader(yaml):
    """A safe loader that refuses duplicate keys (Go's strict YAML does; PyYAML keeps the last)."""

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # PyYAML's own check reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def _yaml_problem(e) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _check_mapping(path: str, where: str, value, known: set[str]) -> None:
    if not isinstance(value, dict):
        raise WebConfigError(f"{path}: {where} must be a mapping of keys to values")
    for key in value:
        if key in _UNSUPPORTED:
            raise WebConfigError(f"{path}: {where}: {_UNSUPPORTED[key]}")
        if key not in known:
            raise WebConfigError(f"{path}: {where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")


def _string(path: str, where: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"{path}: {where} must be a non-empty string")
    return value


def _tls_context(path: str, base: str, tls: dict) -> tuple[ssl.SSLContext, frozenset[str] | None]:
    def one_of(inline: str, file: str, required: bool) -> tuple[str, str] | None:
        if inline in tls and file in tls:
            raise WebConfigError(f"{path}: tls_server_config: give {inline} or {file}, not both")
        if file in tls:
            return "file", os.path.join(base, _string(path, f"tls_server_config.{file}", tls[file]))
        if inline in tls:
            return "inline", _string(path, f"tls_server_config.{inline}", tls[inline])
        if required:
            raise WebConfigError(f"{path}: tls_server_config: missing {file} (or {inline})")
        return None

    cert, key = one_of("cert", "cert_file", True), one_of("key", "key_file", True)
    client_ca = one_of("client_ca", "client_ca_file", False)
    auth_type = tls.get("client_auth_type", "NoClientCert")
    if not isinstance(auth_type, str) or auth_type not in _CLIENT_AUTH:
        hint = ""
        if auth_type == "RequireAnyClientCert":
            hint = " (not supported: Python's ssl always verifies a client certificate it asks for)"
        raise WebConfigError(
            f"{path}: tls_server_config.client_auth_type: {auth_type!r}{hint}; choose from {', '.join(_CLIENT_AUTH)}"
        )
    verify_mode, needs_ca = _CLIENT_AUTH[auth_type]
    if needs_ca and client_ca is None:
        raise WebConfigError(f"{path}: tls_server_config: client_auth_type {auth_type} needs client_ca_file (or client_ca)")
    if client_ca is not None and not needs_ca:
        raise WebConfigError(
            f"{path}: tls_server_config: client_ca_file is set but client_auth_type {auth_type} never checks client "
            "certificates; use RequireAndVerifyClientCert"
        )
    versions = []
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = tls.get(name, default)
        if not isinstance(value, str) or value not in _TLS_VERSIONS:
            raise WebConfigError(f"{path}: tls_server_config.{name}: {value!r}; choose from {', '.join(_TLS_VERSIONS)}")
        versions.append(_TLS_VERSIONS[value])
    if versions[0] > versions[1]:
        raise WebConfigError(f"{path}: tls_server_config: min_version is above max_version")
    prefer_server = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer_server, bool):
        raise WebConfigError(f"{path}: tls_server_config.prefer_server_cipher_suites must be true or false")
    allowed_sans = None
    if "client_allowed_sans" in tls:
        sans = tls["client_allowed_sans"]
        if not isinstance(sans, list) or not all(isinstance(s, str) and s for s in sans):
            raise WebConfigError(f"{path}: tls_server_config.client_allowed_sans must be a list of strings")
        if verify_mode != ssl.CERT_REQUIRED:
            raise WebConfigError(
                f"{path}: tls_server_config: client_allowed_sans needs client_auth_type RequireAndVerifyClientCert"
            )
        allowed_sans = frozenset(_normalize_san(s) for s in sans)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version, ctx.maximum_version = versions
    except (ValueError, ssl.SSLError) as e:
        raise WebConfigError(f"{path}: tls_server_config: this OpenSSL cannot use these TLS versions: {e}") from None
    if not prefer_server:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    def encrypted() -> bytes:  # instead of OpenSSL prompting on the terminal
        raise WebConfigError(f"{path}: tls_server_config: key {_name(key)} is encrypted; give an unencrypted key")

    with _as_file(path, cert) as cert_file, _as_file(path, key) as key_file:
        try:
            ctx.load_cert_chain(cert_file, key_file, password=encrypted)
        except ssl.SSLError as e:
            raise WebConfigError(
                f"{path}: tls_server_config: cannot use certificate {_name(cert)} with key {_name(key)}: {e.reason or e}"
                " (want PEM files, an unencrypted key, and the key that belongs to the certificate)"
            ) from None
    if client_ca is not None:
        try:
            if client_ca[0] == "file":
                ctx.load_verify_locations(cafile=client_ca[1])
            else:
                ctx.load_verify_locations(cadata=client_ca[1])
        except FileNotFoundError as e:
            raise WebConfigError(f"{path}: tls_server_config: cannot read client CA {_name(client_ca)}: {e.strerror}") from None
        except (ssl.SSLError, OSError, ValueError) as e:
            raise WebConfigError(f"{path}: tls_server_config: cannot use client CA {_name(client_ca)}: {e}") from None
    ctx.verify_mode = verify_mode
    return ctx, allowed_sans


class _as_file:
    """A path OpenSSL can load: the named file (checked readable, for a clear message), or an
    inline PEM in a memfd, so a private key given inline never touches a disk."""

    def __init__(self, path: str, source: tuple[str, str]):
        self.path, (self.kind, self.value), self.fd = path, source, None

    def __enter__(self) -> str:
        if self.kind == "file":
            try:
                with open(self.value, "rb"):
                    pass
            except OSError as e:
                message = f"cannot read {self.value}: {e.strerror or e}"
                raise WebConfigError(f"{self.path}: tls_server_config: {message}") from None
            return self.value
        self.fd = os.memfd_create("web-config-pem", os.MFD_CLOEXEC)
        os.write(self.fd, self.value.encode())
        return f"/proc/self/fd/{self.fd}"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _name(source: tuple[str, str]) -> str:
    return source[1] if source[0] == "file" else "(inline)"


def _normalize_san(value: str) -> str:
    try:  # OpenSSL prints IPv6 SANs in full upper case; compare addresses, not spellings
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def _sans(cert: dict | None) -> set[str]:
    # A DirName SAN comes as a tuple of RDNs, not a string: no client_allowed_sans entry names it.
    return {_normalize_san(v) for _, v in (cert or {}).get("subjectAltName", ()) if isinstance(v, str)}


def _peer(sock: socket.socket) -> str:
    try:
        return "%s:%s" % sock.getpeername()[:2]
    except OSError:
        return "(disconnected)"


def _headers(path: str, headers) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise WebConfigError(f"{path}: http_server_config.headers must be a mapping of header names to values")
    result = {}
    for name, value in headers.items():
        if name not in _HEADERS:
            raise WebConfigError(f"{path}: http_server_config.headers: {name!r} cannot be set; choose from {', '.join(_HEADERS)}")
        # RFC 9110 field values: visible ASCII, spaces and tabs. Anything else (a curly quote, a
        # NUL) would pass here and then fail to encode in every response, 401s included.
        if not isinstance(value, str) or not all(c == "\t" or " " <= c <= "~" for c in value):
            raise WebConfigError(f"{path}: http_server_config.headers.{name} must be one line of printable ASCII")
        allowed = _HEADERS[name]
        if allowed is not None and value not in allowed:
            raise WebConfigError(f"{path}: http_server_config.headers.{name}: {value!r}; choose from {', '.join(allowed)}")
        if value:  # blank means unset
            result[name] = value
    return result


def _basic_auth(path: str, users) -> BasicAuth:
    if not isinstance(users, dict):
        raise WebConfigError(f"{path}: basic_auth_users must be a mapping of user names to bcrypt hashes")
    hashes = {}
    for user, hashed in users.items():
        if not isinstance(user, str) or not user or ":" in user:
            # YAML reads unquoted yes/no/123 as booleans and numbers: quote such names.
            raise WebConfigError(
                f"{path}: basic_auth_users: user name {user!r} must be a non-empty string without ':' (quote it)"
            )
        raw = hashed.encode() if isinstance(hashed, str) else b""
        match = _BCRYPT_HASH.fullmatch(raw)
        if not match or not 4 <= int(match.group(1)) <= 31:
            raise WebConfigError(
                f"{path}: basic_auth_users: the password of {user!r} is not a bcrypt hash "
                "(want e.g. $2y$10$ and 53 more characters, as printed by: htpasswd -nBC 10 \"\" | tr -d ':\\n')"
            )
        # htpasswd writes $2y$, the same algorithm as $2b$, which every bcrypt release accepts.
        hashes[user.encode()] = re.sub(rb"^\$2y\$", b"$2b$", raw)
    try:
        return BasicAuth(hashes)
    except ImportError:
        raise WebConfigError(
            f"{path}: basic_auth_users needs the Python package bcrypt ({_INSTALL_HINT})"
        ) from None


def _parse_basic(authorization: str | None) -> tuple[bytes, bytes] | None:
    scheme, _, value = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    return (user, password) if sep else None
