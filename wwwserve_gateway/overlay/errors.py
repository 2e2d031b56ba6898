"""The overlay's typed errors, and the reasons under which refused connections and frames are counted."""

from __future__ import annotations

# Labels of wwwserve_overlay_rejected_total. Each names why a handshake, a frame or a request was
# refused; every one of them except `busy` also closes the connection it arrived on.
REJECT_REASONS = (
    "malformed",  # a handshake message or frame that does not parse or breaks the schema
    "oversized",  # a websocket message over the frame size limit (before decryption, or by the server)
    "undecryptable",  # a sealed frame that fails authentication: altered, replayed, reordered, cut
    "handshake_timeout",  # the handshake did not finish in time
    "wrong_network",  # the peer belongs to another network (genesis)
    "bad_signature",  # the transcript signature does not verify against the claimed id
    "stale",  # the peer's handshake timestamp is too far from our clock
    "version",  # an unsupported protocol version
    "self",  # a connection from (or to) our own node id
    "identity_mismatch",  # the dialled peer is not the node id we expected
    "duplicate",  # the peer already has a live connection to us
    "overloaded",  # too many handshakes in progress at once
    "source_overloaded",  # too many handshakes in progress from one IP address
    "busy",  # a request or message refused because too many are already running on the connection
)


class OverlayError(Exception):
    """Base of every error the overlay raises to its callers."""


class PeerUnreachable(OverlayError):
    """No connection to the peer could be made or kept (unknown address, refused, lost, backing off)."""


class PeerTimeout(OverlayError):
    """The peer did not answer within the request's timeout (the remote side has been told to stop)."""


class HandshakeError(PeerUnreachable):
    """The handshake failed, on our side or refused by the peer. `reason` is one of REJECT_REASONS
    (or `refused` when the peer closed without saying why)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class RemoteError(OverlayError):
    """The peer's handler failed, or refused the call. `type` says how: `handler_error`, `unknown_kind`,
    `busy`, `invalid_response`."""

    def __init__(self, message: str, type: str = "handler_error") -> None:
        super().__init__(message)
        self.message = message
        self.type = type


class FrameError(OverlayError):
    """A frame that cannot be accepted: `reason` is `malformed` or `oversized`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class ChannelError(OverlayError):
    """A sealed frame failed authentication or arrived after the end of its direction."""

    reason = "undecryptable"
