"""CURVE key pairs on disk and the master's allow-list.

Layout of a key directory (what ``python -m actors keys init DIR`` writes)::

    DIR/master.key  DIR/master.key_secret   the master's pair
    DIR/node.key    DIR/node.key_secret     shared by the nodes
    DIR/client.key  DIR/client.key_secret   shared by the clients
    DIR/allowed/node.key DIR/allowed/client.key   public keys the master accepts

Adding a public key file to ``allowed/`` admits another peer; removing one
refuses it at the next handshake.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from actors.errors import KeyFileError

ROLES = ("master", "node", "client")


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def init_keys(directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Create the three key pairs and the allow-list; refuse to overwrite existing keys."""
    root = Path(directory)
    if (root / "master.key_secret").exists() and not overwrite:
        raise KeyFileError(str(root), "keys already exist (pass overwrite=True to replace them)")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    allowed = root / "allowed"
    # The allow-list appears last, whole (a rename): whoever sees it may load any key here.
    staging = allowed if allowed.is_dir() else root / ".allowed.new"
    staging.mkdir(exist_ok=True)
    for role in ROLES:
        public_file, secret_file = zmq.auth.create_certificates(str(root), role)
        os.chmod(secret_file, 0o600)
        if role != "master":
            shutil.copyfile(public_file, staging / f"{role}.key")
    if staging != allowed:
        os.replace(staging, allowed)
    return root


def ensure_keys(directory: str | os.PathLike[str]) -> bool:
    """Create the key pairs and allow-list where there are none yet; True if it did."""
    if (Path(directory) / "master.key_secret").exists():
        return False
    init_keys(directory)
    return True


def allowed_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory) / "allowed"
    if not path.is_dir():
        raise KeyFileError(str(path), "no allow-list directory (run: python -m actors keys init DIR)")
    return path


def load_keypair(directory: str | os.PathLike[str], role: str) -> KeyPair:
    path = Path(directory) / f"{role}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(str(path), f"cannot load secret key: {exc}") from None
    if secret is None:
        raise KeyFileError(str(path), "file holds no secret key")
    return KeyPair(public=public, secret=secret)


def load_public_key(directory: str | os.PathLike[str], role: str) -> bytes:
    path = Path(directory) / f"{role}.key"
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(str(path), f"cannot load public key: {exc}") from None
    return public
