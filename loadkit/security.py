"""Secret masking, SQL identifier quoting and safe path templates.

Everything that turns config strings into SQL, paths or log text goes through here,
so the rules (no passwords in output, no unquoted identifiers, no attribute access
in templates, no paths outside the data root) live in one place.
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from loadkit.config import IDENTIFIER
from loadkit.errors import ConfigError

_MASK = "***"
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")
SECRET_KEYS = ("password", "passwd", "secret", "token", "dsn", "webhook_url", "uri")


def mask_dsn(dsn: str | None) -> str | None:
    """The DSN with any password replaced by ***; works for URLs and key=value strings."""
    if dsn is None:
        return None
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            netloc = f"{parts.username or ''}:{_MASK}@{host}"
            dsn = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        dsn = re.sub(r"(password=)[^&]*", rf"\1{_MASK}", dsn, flags=re.IGNORECASE)
        return dsn
    return _KV_PASSWORD.sub(rf"\1{_MASK}", dsn)


def mask_text(text: str) -> str:
    """Mask any DSN password that appears inside free text (error messages, logs)."""
    text = _URL_PASSWORD.sub(rf"\1{_MASK}\3", text)
    return _KV_PASSWORD.sub(rf"\1{_MASK}", text)


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
        out.append(format(values[field_name], spec))
    return "".join(out)


def confine(path: Path, root: Path) -> Path:
    """The resolved path, if it lies inside root; a ConfigError otherwise."""
    resolved = path.resolve()
    root_resolved = root.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise ConfigError(f"source path {path} resolves outside the data root {root_resolved}")
    return resolved
