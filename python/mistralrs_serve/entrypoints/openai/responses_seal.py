"""`encrypted_content` of reasoning items: the thinking text sealed so that a
client holding no stored state (Codex sends `store: false`) can hand it back
on its next turn, and only this server (its key) can read it again.

AES-GCM from `cryptography` when it is installed; otherwise the text is
signed, not hidden (HMAC-SHA256 over base64). Either way a token that was
altered or sealed under another key does not open. The key lives in the data
directory, so tokens survive a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

AESGCM: Any
try:  # optional: sealing falls back to signing without it
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError:  # pragma: no cover - depends on the environment
    AESGCM = None

KEY_FILE = "responses-reasoning.key"
KEY_BYTES = 32
_SEALED, _SIGNED = "mrs1g", "mrs1h"  # prefixes: AES-GCM, HMAC-signed


class ReasoningSeal:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.key = _load_key(Path(data_dir) / KEY_FILE)

    def seal(self, text: str) -> str:
        data = text.encode()
        if AESGCM is not None:
            nonce = os.urandom(12)
            sealed = AESGCM(self.key).encrypt(nonce, data, _SEALED.encode())
            return f"{_SEALED}.{_b64(nonce + sealed)}"
        tag = hmac.new(self.key, _SIGNED.encode() + data, hashlib.sha256).digest()
        return f"{_SIGNED}.{_b64(data)}.{_b64(tag)}"

    def open(self, token: str) -> str:
        """The text sealed in `token`; ValueError when this server did not seal it."""
        kind, _, rest = token.partition(".")
        try:
            if kind == _SEALED and AESGCM is not None:
                raw = _unb64(rest)
                return AESGCM(self.key).decrypt(raw[:12], raw[12:], _SEALED.encode()).decode()
            if kind == _SIGNED:
                body, _, tag = rest.partition(".")
                data = _unb64(body)
                expected = hmac.new(self.key, _SIGNED.encode() + data, hashlib.sha256).digest()
                if hmac.compare_digest(expected, _unb64(tag)):
                    return data.decode()
        except Exception:  # any malformed token: the same answer as a forged one
            pass
        raise ValueError("encrypted_content was not produced by this server (or was altered)")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _load_key(path: Path) -> bytes:
    """The data directory's key, made on first use (atomically: two servers starting at once agree)."""
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made the key first: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()
