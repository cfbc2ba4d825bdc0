"""A node's identity: one RSA key that is both its libp2p peer id and the key that signs its DHT records.

libp2p derives an RSA peer id from the public key (sha256 multihash of the protobuf-encoded key), so a record
signed with the key whose peer id it names can only come from that peer: :func:`peer_id_of` lets every DHT peer
and client check the binding without asking the node.

The key lives in a hivemind identity file (a libp2p ``PrivateKey`` protobuf), the format ``P2P.create`` reads: with
``--identity-path`` it persists (generated on first start, kept ``0400``), so a node keeps its peer id and the
history clients keep about it across restarts; without it a fresh key is made per run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import base58
import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from .errors import BadRequestError


@dataclass(frozen=True)
class NodeIdentity:
    """The key a node signs with and the identity file its p2p daemon reads."""

    private_key: RSAPrivateKey
    path: Path
    """Identity file for ``DHT(identity_path=...)``."""
    persistent: bool
    """False for a per-run key (its file is deleted once the daemon has read it)."""

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.private_key.get_public_key().to_bytes())


def load_identity(path: Path | None) -> NodeIdentity:
    """Read the identity at ``path`` (generating it there if missing), or make a per-run one when ``path`` is None.

    Raises:
        BadRequestError: the file exists but holds no RSA libp2p private key.
    """
    if path is None:
        fd, name = tempfile.mkstemp(prefix="swarm-identity-", suffix=".key")
        os.close(fd)
        os.unlink(name)
        P2P.generate_identity(name)
        return NodeIdentity(_read_key(Path(name)), Path(name), persistent=False)
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return NodeIdentity(_read_key(path), path, persistent=True)


def _read_key(path: Path) -> RSAPrivateKey:
    try:
        proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        key = serialization.load_der_private_key(proto.data, password=None)
    except Exception as e:
        raise BadRequestError(f"{path} is not a libp2p identity file ({type(e).__name__}: {e}); delete it to "
                              "generate a new one, or point --identity-path elsewhere.") from e
    if proto.key_type != crypto_pb2.KeyType.RSA or not isinstance(key, rsa.RSAPrivateKey):
        raise BadRequestError(f"{path} holds a non-RSA key; record signatures need an RSA identity (delete the file "
                              "to generate one).")
    out = RSAPrivateKey.__new__(RSAPrivateKey)
    out.__setstate__({"_private_key": proto.data})  # hivemind's own (pickle) path from DER bytes to a key
    return out


@functools.lru_cache(maxsize=1024)
def peer_id_of(public_key_ssh: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key in OpenSSH format (as in ``[owner:...]`` markers).

    Raises:
        ValueError: not an RSA public key.
    """
    key = serialization.load_ssh_public_key(public_key_ssh)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()
