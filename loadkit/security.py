"""Secret masking, SQL identifier quoting and safe path templates.

Everything that turns config strings into SQL, paths or log text goes through here,
so the rules (no passwords in output, no unquoted identifiers, no attribute access
in templates, no paths outside the data root) live in one place.
"""
from __future__ import annotations

import re
import string
import threading
from pathlib import Path
from typing import Any, List, Mapping, Optional, Set, Tuple
from urllib.parse import quote, quote_plus, unquote

from loadkit.errors import ConfigError

# A plain SQL identifier: what loadkit accepts for schema, table and column names (at most 63 bytes).
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

_MASK = "***"
# libpq's conninfo value rules: single-quoted with backslash escapes (an unterminated quote runs to
# the end), or a run of non-blank characters in which a backslash escapes the next (even a blank).
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:\\.|\\$|[^\s\\])+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&\s]*)", re.IGNORECASE)
SECRET_KEYS = ("password", "passwd", "secret", "token", "dsn", "webhook_url", "uri")
# Registered secrets shorter than this are masked only where a DSN's structure says "password",
# not in free text (replacing every "ab" in a log line would garble it and reveal the length anyway).
MIN_FREE_TEXT_SECRET = 4
_SECRETS: Set[str] = set()
_SECRETS_LOCK = threading.Lock()


def register_secret(value: Optional[str]) -> None:
    """Remember a secret: from now on ``mask_text`` replaces it (and its percent-encodings) anywhere.

    Registered by whoever first sees a DSN (``register_dsn``, ``db.parse_dsn`` with libpq's own
    reading of the password), so log lines, error texts, MLflow tags and ledger rows written
    later cannot show it even where it is not in DSN shape."""
    if not value:
        return
    forms = {value, quote(value, safe=""), quote(value), quote_plus(value)}
    with _SECRETS_LOCK:
        _SECRETS.update(f for f in forms if f)


def _userinfo_password(dsn: str) -> Optional[Tuple[int, int]]:
    """[start, end) of the password in a URI's userinfo, read generously: up to the LAST '@' of the
    authority, so an unencoded '@', '/', '#', '?' or '%' in a password is still found."""
    scheme_end = dsn.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    at = dsn.rfind("@", start)
    if at < 0:
        return None
    colon = dsn.find(":", start, at)
    if colon < 0:
        return None
    return colon + 1, at


def uri_password(dsn: str) -> Optional[str]:
    """The password as written in a URI's userinfo (still percent-encoded), or None (no URI / no password)."""
    span = _userinfo_password(dsn)
    return dsn[span[0]:span[1]] if span is not None else None


def uri_password_misread(dsn: str, parsed: Optional[str]) -> bool:
    """True if libpq's password for a URI (``parsed``, from its own parse) is not the one written in its userinfo:
    an unencoded '@', '/', ':' ... split it, and its pieces became host, port or database names.

    The generous reading (``uri_password``: up to the last '@') finds every such password, but an '@' in a
    query value (``?application_name=a@b``, ``?password=x@y``) or the path made valid DSNs look misread (a
    fresh-user review, session 20). So a difference counts only when the authority -- from the scheme to the
    first '/', '?' or '#' after the first '@' -- holds more than one '@', or the userinfo's password up to the
    first '@' is not libpq's (and no ``password=`` query parameter supplies libpq's)."""
    if not re.match(r"\s*postgres(?:ql)?://", dsn):
        return False  # a key=value string: a value holding "://" and "@" is no URI (a second review)
    written = uri_password(dsn)
    if written is None or (parsed or "") == unquote(written):
        return False
    start = dsn.find("://") + 3
    first_at = dsn.find("@", start)
    rest = dsn[first_at + 1:]
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    if "@" in rest[:min(ends, default=len(rest))]:
        return True  # two '@' in the authority: a password with an unencoded '@'
    userinfo = dsn[start:first_at]
    if ":" not in userinfo:
        return False  # no password in the userinfo; libpq's came from the query
    strict = userinfo.split(":", 1)[1]
    query = rest.split("?", 1)[1] if "?" in rest else ""
    return (parsed or "") != unquote(strict) and not re.search(r"(^|&)password=", query)


def _kv_passwords(dsn: str) -> List[Tuple[int, int]]:
    """[start, end) of each password value in a libpq key=value string (quoted values per libpq:
    single quotes, backslash escapes; an unterminated quote runs to the end)."""
    spans = []
    for m in _KV_PASSWORD.finditer(dsn):
        spans.append((m.start(2), m.end(2)))
    return spans


def _unquote_kv(value: str) -> str:
    if len(value) >= 1 and value[0] == "'":
        body = value[1:-1] if len(value) >= 2 and value.endswith("'") else value[1:]
        return re.sub(r"\\(.)", r"\1", body)
    return value


def register_dsn(dsn: Optional[str]) -> None:
    """Register every password a DSN may hold (URI userinfo, ?password=, key=value password)."""
    if not dsn:
        return
    span = _userinfo_password(dsn)
    if span is not None:
        raw = dsn[span[0]:span[1]]
        register_secret(raw)
        register_secret(unquote(raw))
    for m in _QUERY_PASSWORD.finditer(dsn):
        register_secret(m.group(2))
        register_secret(unquote(m.group(2)))
    for a, b in _kv_passwords(dsn):
        register_secret(dsn[a:b])
        register_secret(_unquote_kv(dsn[a:b]))


def mask_dsn(dsn: Optional[str]) -> Optional[str]:
    """The DSN with any password replaced by ***; URIs (userinfo, ?password=) and key=value strings.

    Positional (the password's place in the DSN's structure), so it masks passwords of any
    length and any characters, malformed DSNs included; the passwords are also registered
    (``register_secret``) for ``mask_text``. ``db.parse_dsn`` adds libpq's own reading."""
    if dsn is None:
        return None
    register_dsn(dsn)
    if "://" in dsn:
        span = _userinfo_password(dsn)
        if span is not None:
            dsn = dsn[:span[0]] + _MASK + dsn[span[1]:]
        dsn = _QUERY_PASSWORD.sub(lambda m: m.group(1) + _MASK, dsn)
        return _scrub(dsn)
    out, last = [], 0
    for a, b in _kv_passwords(dsn):
        out.append(dsn[last:a] + _MASK)
        last = b
    out.append(dsn[last:])
    return _scrub("".join(out))


def _scrub(text: str) -> str:
    """Replace every registered secret (longest first) that is long enough to mask in free text."""
    with _SECRETS_LOCK:
        secrets = sorted((s for s in _SECRETS if len(s) >= MIN_FREE_TEXT_SECRET), key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def mask_text(text: str) -> str:
    """Mask DSN passwords inside free text (error messages, logs, YAML dumps): by DSN shape, then
    every registered secret wherever it appears."""
    text = _scrub(text)
    text = _URL_PASSWORD.sub(rf"\1{_MASK}\3", text)
    text = _QUERY_PASSWORD.sub(lambda m: m.group(1) + _MASK, text)
    return _KV_PASSWORD.sub(lambda m: m.group(1) + _MASK, text)


def mask_mapping(data: Any) -> Any:
    """A copy of nested config data with secret-looking values masked."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if isinstance(value, str) and any(s in str(key).lower() for s in SECRET_KEYS):
                out[key] = mask_dsn(value) if "://" in value or "=" in value else _MASK
            else:
                out[key] = mask_mapping(value)
        return out
    if isinstance(data, list):
        return [mask_mapping(v) for v in data]
    if isinstance(data, str):
        return mask_text(data)
    return data


class MaskingStream:
    """A text stream wrapper that masks secrets in everything written (``mask_text``).

    The CLI wraps stdout/stderr with it, so text loadkit does not format itself (Hydra's
    ``--cfg job`` dump, its override parse errors, tracebacks) cannot show a DSN password."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def register_argv_secrets(argv: List[str]) -> None:
    """Register the passwords of DSNs given as overrides (``sink.dsn=...``) before anything prints them."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and any(k in key.lower() for k in SECRET_KEYS):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            register_dsn(value)


def quote_ident(name: str) -> str:
    """A validated, double-quoted SQL identifier. Refuses anything that is not a plain name."""
    if not IDENTIFIER.match(name):
        raise ConfigError(f"refusing unsafe SQL identifier {name!r}")
    return '"' + name + '"'


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def render_path_template(template: str, values: Mapping[str, int]) -> str:
    """Fill {year}/{month} placeholders; any other field, attribute or index is refused."""
    out = []
    for literal, field_name, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if field_name is None:
            continue
        if field_name not in values or conversion:
            raise ConfigError(f"path template {template!r} may only use {sorted(values)} placeholders")
        if spec and not re.fullmatch(r"0?\d{0,2}d?", spec):
            raise ConfigError(f"path template {template!r} has an unsupported format spec {spec!r}")
        out.append(format(values[field_name], spec or ""))
    return "".join(out)


def confine(path: Path, root: Path) -> Path:
    """The resolved path, if it lies inside root; a ConfigError otherwise."""
    resolved = path.resolve()
    root_resolved = root.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise ConfigError(f"source path {path} resolves outside the data root {root_resolved}")
    return resolved
