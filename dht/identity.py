"""A peer's identity: one Ed25519 key that is both its libp2p peer id and the key that signs its records.

libp2p derives an Ed25519 peer id by inlining the public key (identity multihash), so anyone can
recover the public key from the peer id alone: a record signed by that key is provably from that peer.
The key file is the libp2p protobuf format that hivemind's p2pd reads with ``identity_path``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.proto import crypto_pb2

_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes} -> 08 01 12 20 || key
_PUBKEY_PROTO_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
# identity multihash: code 0x00, length 36
_MULTIHASH_PREFIX = bytes([0x00, 0x24]) + _PUBKEY_PROTO_PREFIX


def peer_id_of(public_key: Ed25519PublicKey) -> str:
    """The base58 libp2p peer id ('12D3KooW...') of an Ed25519 public key."""
    return base58.b58encode(_MULTIHASH_PREFIX + public_key.public_bytes(**_RAW)).decode()


def public_key_of(peer_id: str) -> Ed25519PublicKey | None:
    """The Ed25519 public key inlined in a peer id, or None if the id does not inline an Ed25519 key."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        return None
    if len(raw) != len(_MULTIHASH_PREFIX) + 32 or not raw.startswith(_MULTIHASH_PREFIX):
        return None
    return Ed25519PublicKey.from_public_bytes(raw[len(_MULTIHASH_PREFIX):])


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    public_key = public_key_of(peer_id)
    if public_key is None:
        return False
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey
    path: str  # the libp2p key file p2pd reads (identity_path)

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.private_key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def _write_key_file(private_key: Ed25519PrivateKey, path: str) -> None:
    seed = private_key.private_bytes(
        encoding=serialization.Encoding.Raw,
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
    )
    data = seed + private_key.public_key().public_bytes(**_RAW)  # go-libp2p's 64-byte form
    proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())


def load_or_create(path: str | None = None) -> Identity:
    """Load the identity at ``path``, creating it (owner-only permissions) if it does not exist.

    With no path, a fresh identity lives in a temporary file for this process only.
    """
    if path is None:
        directory = tempfile.mkdtemp(prefix="swarmllm-id-")
        path = os.path.join(directory, "identity.key")
    if not os.path.exists(path):
        _write_key_file(Ed25519PrivateKey.generate(), path)
    with open(path, "rb") as f:
        proto = crypto_pb2.PrivateKey.FromString(f.read())
    if proto.key_type != crypto_pb2.KeyType.Ed25519 or len(proto.data) not in (64, 96):
        raise ValueError(f"{path} is not an Ed25519 libp2p private key: delete it to create a new identity")
    return Identity(Ed25519PrivateKey.from_private_bytes(proto.data[:32]), path)
