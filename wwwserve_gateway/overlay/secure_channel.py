"""Sealed frames: libsodium secretstream (XChaCha20-Poly1305) per direction, through PyNaCl's bindings.

Each direction has its own state, keyed by that direction's session key from the handshake. The
first frame sent carries the 24-byte secretstream header in front of its ciphertext. Secretstream
chains every message to the ones before it, so a replayed, reordered, dropped, cut or altered frame
fails to open. A frame tagged FINAL ends its direction cleanly; anything after it is refused.
"""

from __future__ import annotations

import nacl.bindings as sodium
import nacl.exceptions

from wwwserve_gateway.overlay.errors import ChannelError

HEADER_BYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
KEY_BYTES = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
# The most a sealed frame adds to its plaintext (the first one also carries the header).
OVERHEAD = HEADER_BYTES + ABYTES


class SecureChannel:
    def __init__(self, tx_key: bytes, rx_key: bytes) -> None:
        if len(tx_key) != KEY_BYTES or len(rx_key) != KEY_BYTES:
            raise ValueError("secretstream keys are 32 bytes")
        self._tx_key: bytes | None = tx_key
        self._rx_key: bytes | None = rx_key
        self._tx = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._rx = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.tx_finished = False
        self.rx_finished = False

    def seal(self, plaintext: bytes, *, final: bool = False) -> bytes:
        if self.tx_finished:
            raise ChannelError("the sending direction has ended")
        header = b""
        if self._tx_key is not None:
            header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._tx, self._tx_key)
            self._tx_key = None
        tag = TAG_FINAL if final else TAG_MESSAGE
        sealed = sodium.crypto_secretstream_xchacha20poly1305_push(self._tx, plaintext, tag=tag)
        self.tx_finished = final
        return header + sealed

    def open(self, frame: bytes) -> tuple[bytes, bool]:
        """The plaintext of the next frame, and whether it ended the direction; ChannelError if the
        frame is not the next one this direction's key sealed."""
        if self.rx_finished:
            raise ChannelError("a frame after the end of the stream")
        try:
            if self._rx_key is not None:
                if len(frame) < HEADER_BYTES + ABYTES:
                    raise ChannelError("the first frame is shorter than the secretstream header")
                sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                    self._rx, frame[:HEADER_BYTES], self._rx_key
                )
                self._rx_key = None
                frame = frame[HEADER_BYTES:]
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._rx, frame)
        except (nacl.exceptions.CryptoError, TypeError, ValueError) as exc:
            raise ChannelError(f"frame failed to open: {exc}") from None
        if tag == TAG_FINAL:
            self.rx_finished = True
        elif tag != TAG_MESSAGE:
            raise ChannelError(f"unexpected secretstream tag {tag}")
        return plaintext, self.rx_finished
