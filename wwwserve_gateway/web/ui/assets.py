"""The dashboard's files, read from the installed package once and served from memory."""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources

PACKAGE = "wwwserve_gateway.web.ui"
FOLDER = "static"
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


class Assets:
    def __init__(self) -> None:
        self._cache: dict[str, Asset | None] = {}

    def get(self, path: str) -> Asset | None:
        """The file at `path` under static/ (None if there is none; never outside static/)."""
        if path in self._cache:
            return self._cache[path]
        parts = path.split("/")
        if not path or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        node = resources.files(PACKAGE).joinpath(FOLDER, *parts)
        asset = None
        if node.is_file():
            body = node.read_bytes()
            suffix = "." + parts[-1].rsplit(".", 1)[-1] if "." in parts[-1] else ""
            media = TYPES.get(suffix) or mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
            asset = Asset(body, media, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
        if len(self._cache) < 256:
            self._cache[path] = asset
        return asset
