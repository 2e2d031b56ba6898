"""The overlay transport between nodes: see overlay.Overlay and docs/design.md."""

from wwwserve_gateway.overlay.errors import (
    ChannelError,
    FrameError,
    HandshakeError,
    OverlayError,
    PeerTimeout,
    PeerUnreachable,
    RemoteError,
)
from wwwserve_gateway.overlay.overlay import PATH, Overlay, overlay_url

__all__ = [
    "PATH",
    "ChannelError",
    "FrameError",
    "HandshakeError",
    "Overlay",
    "OverlayError",
    "PeerTimeout",
    "PeerUnreachable",
    "RemoteError",
    "overlay_url",
]
