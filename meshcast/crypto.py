"""Signatures: the channel key signs chunks, the tracker key signs tokens (Ed25519).

Nodes never call `cryptography` directly: they hold a `Crypto` object, so the simulator can run
the very same node code with `SimCrypto`, which keeps every check on fields (expiry, who may
talk to whom) but does not spend CPU on curve arithmetic it does not model.

A chunk signature covers `(channel, seq, flags, ts, size, sha256(payload))`: everything a player
or a relay acts on. One signature per chunk (~30k signs/s, ~10k verifies/s here), never per packet.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshcast.errors import MeshcastError
from meshcast.messages import SIG_LEN, TOKEN_BATCH, TOKEN_DIGEST, TOKEN_SALT, ChunkHead, Token

_CHUNK_DOMAIN = b"meshcast/chunk/1\0"
_TOKEN_DOMAIN = b"meshcast/token/1\0"
_BATCH_DOMAIN = b"meshcast/tokens/1\0"
_ANNOUNCE_DOMAIN = b"meshcast/announce/1\0"


def chunk_signing_input(channel: str, seq: int, flags: int, ts: float, payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).digest()
    return _CHUNK_DOMAIN + msgpack.packb([channel, seq, flags, ts, len(payload), digest])


def token_signing_input(child: int, parent: int, channel: str, substream: int, expires: float) -> bytes:
    return _TOKEN_DOMAIN + msgpack.packb([child, parent, channel, substream, expires])


_BATCH_AT: Final = SIG_LEN + TOKEN_SALT
"""Where a batched token's list of digests starts in its `sig` (after signature and salt)."""


def token_digest(token: Token, salt: bytes) -> bytes:
    """What a batch signature lists for `token`: its salt and signed fields, hashed."""
    data = token_signing_input(token.child, token.parent, token.channel, token.substream,
                               token.expires)
    return hashlib.blake2b(salt + data, digest_size=TOKEN_DIGEST).digest()


def _in_batch(token: Token) -> bool:
    """Is `token` one of those its batch lists (at a digest boundary)?"""
    sig = token.sig
    digest = token_digest(token, sig[SIG_LEN:_BATCH_AT])
    return any(sig[i:i + TOKEN_DIGEST] == digest for i in range(_BATCH_AT, len(sig), TOKEN_DIGEST))


def announce_signing_input(channel: str, address: str) -> bytes:
    return _ANNOUNCE_DOMAIN + msgpack.packb([channel, address])


class Signer(Protocol):
    """What `Crypto` signs with: a `SigningKey` (a protocol, so a compiled simulator build does
    not insist on that class where `SimCrypto` ignores the key)."""

    public: bytes

    def sign(self, data: bytes) -> bytes: ...


class SigningKey:
    """An Ed25519 private key (the channel's or the tracker's)."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()
        self.public: bytes = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "SigningKey":
        """Load a PEM key, or generate one and save it (mode 0600) if the file does not exist."""
        p = Path(path)
        if p.exists():
            try:
                key = serialization.load_pem_private_key(p.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise MeshcastError(f"{p}: not a PEM private key ({exc})") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise MeshcastError(f"{p}: not an Ed25519 key")
            return cls(key)
        self = cls()
        p.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return self


class Crypto:
    """Real Ed25519 signing and verification, with a cache of parsed public keys."""

    def __init__(self) -> None:
        self._keys: dict[bytes, Ed25519PublicKey] = {}

    def _verify(self, public: bytes, sig: bytes, data: bytes) -> bool:
        key = self._keys.get(public)
        if key is None:
            try:
                key = self._keys[public] = Ed25519PublicKey.from_public_bytes(public)
            except ValueError:
                return False
        try:
            key.verify(sig, data)
            return True
        except InvalidSignature:
            return False

    def sign_chunk(self, key: Signer, channel: str, seq: int, flags: int, ts: float,
                   payload: bytes) -> ChunkHead:
        sig = key.sign(chunk_signing_input(channel, seq, flags, ts, payload))
        return ChunkHead(channel, seq, len(payload), flags, ts, sig)

    def verify_chunk(self, public: bytes, head: ChunkHead, payload: bytes) -> bool:
        if len(payload) != head.size:
            return False
        data = chunk_signing_input(head.channel, head.seq, head.flags, head.ts, payload)
        return self._verify(public, head.sig, data)

    def issue_token(self, key: Signer, child: int, parent: int, channel: str, substream: int,
                    expires: float) -> Token:
        sig = key.sign(token_signing_input(child, parent, channel, substream, expires))
        return Token(child, parent, channel, substream, expires, sig)

    def issue_tokens(self, key: Signer, tokens: Sequence[Token]) -> list[Token]:
        """Sign `tokens` (their `sig` unset) with one signature over the list of all their
        digests, which each then carries after it (`Token.sig`). The tracker hands out a
        viewer's ~10 tokens at once: one signature instead of ten took its handling of a join
        from 883 to 567 µs of CPU (bench/tracker_cpu.py). At most `TOKEN_BATCH` tokens; one
        alone is signed as `issue_token` would."""
        if len(tokens) == 1:
            t = tokens[0]
            return [self.issue_token(key, t.child, t.parent, t.channel, t.substream, t.expires)]
        if not 1 < len(tokens) <= TOKEN_BATCH:
            raise ValueError(f"a batch holds 1 to {TOKEN_BATCH} tokens, not {len(tokens)}")
        salts = [os.urandom(TOKEN_SALT) for _ in tokens]
        batch = b"".join(token_digest(t, salt) for t, salt in zip(tokens, salts))
        sig = key.sign(_BATCH_DOMAIN + batch)
        return [Token(t.child, t.parent, t.channel, t.substream, t.expires, sig + salt + batch)
                for t, salt in zip(tokens, salts)]

    def token_valid(self, public: bytes, token: Token) -> bool:
        sig = token.sig
        if len(sig) > SIG_LEN:
            return _in_batch(token) and self._verify(public, sig[:SIG_LEN],
                                                    _BATCH_DOMAIN + sig[_BATCH_AT:])
        data = token_signing_input(token.child, token.parent, token.channel, token.substream,
                                   token.expires)
        return self._verify(public, token.sig, data)

    def sign_announce(self, key: Signer, channel: str, address: str) -> bytes:
        return key.sign(announce_signing_input(channel, address))

    def announce_valid(self, public: bytes, channel: str, address: str, proof: bytes) -> bool:
        return self._verify(public, proof, announce_signing_input(channel, address))


FORGED: Final = b"\xff" * SIG_LEN
"""In the simulator, a chunk or token carrying this signature fails verification."""
_SIM_SIG: Final = b"\x00" * SIG_LEN


class SimCrypto(Crypto):
    """For the simulator: same interface, no curve arithmetic, no hashing.

    Chunk and announce signatures are a constant; a token's names the key that issued it (its
    public half, padded), so a token of one tracker fails where another's key is expected, as
    with real keys (a restarted tracker has a new one). `FORGED` marks data a simulated
    attacker altered, which fails verification exactly where real data would.

    `signed` and `checked` count the token and announcement signatures made and verified (not
    chunks'): the simulator charges a tracker's CPU by them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sigs: dict[bytes, bytes] = {}
        """Public key → the signature of every token it issues (one object per key)."""
        self._batches: dict[tuple[bytes, int], bytes] = {}
        """(public key, n) → `sig` of every token in its batches of n: the key's, then zeros
        for salt and digests (one object each: 100k simulated viewers hold ~5 tokens each)."""
        self.signed = 0
        self.checked = 0

    def _sig(self, public: bytes) -> bytes:
        sig = self._sigs.get(public)
        if sig is None:
            sig = self._sigs[public] = public[:SIG_LEN].ljust(SIG_LEN, b"\0")
        return sig

    def sign_chunk(self, key: Any, channel: str, seq: int, flags: int, ts: float,
                   payload: bytes) -> ChunkHead:
        return ChunkHead(channel, seq, len(payload), flags, ts, _SIM_SIG)

    def verify_chunk(self, public: bytes, head: ChunkHead, payload: bytes) -> bool:
        return head.sig != FORGED and len(payload) == head.size

    def issue_token(self, key: Any, child: int, parent: int, channel: str, substream: int,
                    expires: float) -> Token:
        self.signed += 1
        return Token(child, parent, channel, substream, expires, self._sig(key.public))

    def issue_tokens(self, key: Any, tokens: Sequence[Token]) -> list[Token]:
        """One signature for them all, as `Crypto` does; salt and digests are zeros, of their
        real size (the simulator counts control bytes by it)."""
        self.signed += 1
        n = len(tokens)
        sig = self._sig(key.public)
        if n > 1:
            sig = self._batches.setdefault((key.public, n),
                                           sig + bytes(TOKEN_SALT + TOKEN_DIGEST * n))
        return [Token(t.child, t.parent, t.channel, t.substream, t.expires, sig) for t in tokens]

    def token_valid(self, public: bytes, token: Token) -> bool:
        self.checked += 1
        return token.sig.startswith(self._sig(public))

    def sign_announce(self, key: Any, channel: str, address: str) -> bytes:
        self.signed += 1
        return _SIM_SIG

    def announce_valid(self, public: bytes, channel: str, address: str, proof: bytes) -> bool:
        self.checked += 1
        return proof != FORGED


class SimKey:
    """A stand-in `SigningKey` for the simulator (no key generation cost)."""

    __slots__ = ("public",)

    def __init__(self, tag: int = 0) -> None:
        self.public = tag.to_bytes(32, "big")
