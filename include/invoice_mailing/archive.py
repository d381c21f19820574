"""Keep the exact bytes of each sent message, content-addressed by their SHA-256 (off by default).

``INVOICE_MAILING_ARCHIVE`` names a folder or any URL that Airflow's ``ObjectStoragePath`` supports
(``s3://bucket/invoice-mail``, ``gs://...``, ``file:///var/lib/invoice-mailing/archive``); a URL may
carry an Airflow connection as ``s3://aws_default@bucket/prefix``. A message is stored once at
``<sha256[:2]>/<sha256>.eml`` however many recipients got it; its delivery rows record the hash and
the full URL, so the archive can move prefix later without losing what the rows point to.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

ARCHIVE_ENV = "INVOICE_MAILING_ARCHIVE"
log = logging.getLogger(__name__)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _storage(url: str):
    from airflow.sdk import ObjectStoragePath

    if "://" not in url:  # a plain folder
        url = Path(url).resolve().as_uri()
    return ObjectStoragePath(url)


class Archive:
    """Writes and reads archived messages under one base location."""

    def __init__(self, base: str):
        self.base = base

    @classmethod
    def from_env(cls) -> Archive | None:
        base = os.environ.get(ARCHIVE_ENV, "").strip()
        return cls(base) if base else None

    def keep(self, data: bytes) -> str | None:
        """Write ``data`` once (the same bytes are the same file); return its full URL.

        Never raises: the server has already accepted the message, so a broken archive is logged and
        the delivery stays ``sent`` with its hash and no path."""
        sha256 = digest(data)
        try:
            path = _storage(self.base) / sha256[:2] / f"{sha256}.eml"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return str(path)
        except Exception:  # noqa: BLE001 - any storage failure: the log says so, the row has no path
            log.exception("Could not archive message %s under %s", sha256, self.base)
            return None


def read(path: str) -> bytes:
    """The stored bytes of an archived message (raises FileNotFoundError when they are gone)."""
    return _storage(path).read_bytes()


def verify(path: str | None, sha256: str | None) -> str:
    """``match``, ``changed`` (the stored bytes no longer have the recorded hash), ``missing`` or ``none``."""
    if not path or not sha256:
        return "none"
    try:
        data = read(path)
    except (FileNotFoundError, OSError):
        return "missing"
    return "match" if digest(data) == sha256 else "changed"
