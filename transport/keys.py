"""CURVE key pairs on disk and the master's allow-list.

Layout of a key directory (what ``python -m actors keys init DIR`` writes)::

    DIR/master.key  DIR/master.key_secret   the master's pair
    DIR/node.key    DIR/node.key_secret     shared by the nodes
    DIR/client.key  DIR/client.key_secret   shared by the clients
    DIR/allowed/node.key DIR/allowed/client.key   public keys the master accepts

A file's name in ``allowed/`` says the role it grants: ``node*.key`` a node,
``client*.key`` a client (``python -m actors keys add DIR --role node NAME``
makes a key pair for one more peer and admits it). The master holds every
message to the role of the key it came with.
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


def role_of_key_file(name: str) -> str | None:
    """The role an allow-list file grants, from its name: ``node.key``, ``node-NAME.key`` and
    ``client.key``, ``client-NAME.key``; anything else grants none."""
    stem = name.removesuffix(".key")
    role = stem.split("-", 1)[0]
    return role if role in ("node", "client") and name.endswith(".key") else None


def allowed_roles(allowed: str | os.PathLike[str]) -> dict[str, str]:
    """{public key as Z85 text (ZAP's User-Id): role} of the allow-list folder ``allowed``."""
    roles: dict[str, str] = {}
    for path in sorted(Path(allowed).glob("*.key")):
        role = role_of_key_file(path.name)
        if role is None:
            continue
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError):
            continue  # a file that is not a key admits nobody (the authenticator skips it too)
        roles[public.decode("ascii")] = role
    return roles


class AllowList:
    """The allow-list folder as the master reads it: which key may connect, in which role.

    Read again whenever the folder changes (a key file added or removed), so that admitting or
    refusing a peer takes effect at its next handshake, without a restart."""

    def __init__(self, allowed: str | os.PathLike[str]) -> None:
        self.path = os.fspath(allowed)
        self._roles: dict[str, str] = {}
        self._stamp: int | None = None

    def role_of(self, key: str | bytes) -> str | None:
        """The role of a public key (Z85 text), None when the allow-list does not admit it."""
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            return None
        if stamp != self._stamp:
            self._roles, self._stamp = allowed_roles(self.path), stamp
        text = key.decode("ascii", errors="replace") if isinstance(key, bytes) else key
        return self._roles.get(text)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's CURVE credentials provider: admit the keys that have a role."""
        return self.role_of(key) is not None


def add_key(directory: str | os.PathLike[str], role: str, name: str) -> Path:
    """Key material for one more peer, admitted as ``role`` (``DIR/allowed/ROLE-NAME.key``):
    the folder ``DIR/peers/NAME`` with its key pair and the master's public key, ready to hand
    to that peer (``Client(address, keys=FOLDER)``, ``python -m actors.node --keys FOLDER``)."""
    if role not in ("node", "client"):
        raise KeyFileError(role, "a key's role is node or client")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise KeyFileError(name, "a key's name is letters, digits, - and _")
    root = Path(directory)
    admitted = allowed_dir(root) / f"{role}-{name}.key"
    folder = root / "peers" / name
    if admitted.exists() or folder.exists():
        raise KeyFileError(str(admitted), "a key of that name exists already")
    folder.mkdir(parents=True, mode=0o700)
    public_file, secret_file = zmq.auth.create_certificates(str(folder), role)
    os.chmod(secret_file, 0o600)
    shutil.copyfile(root / "master.key", folder / "master.key")
    shutil.copyfile(public_file, admitted)
    return folder


def allowed_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory) / "allowed"
    if not path.is_dir():
        raise KeyFileError(str(path), "no allow-list directory (run: python -m actors keys init DIR)")
    return path


def _missing_folder(directory: str | os.PathLike[str]) -> None:
    if not Path(directory).is_dir():
        raise KeyFileError(str(directory), "no such key folder: pass the one the master's banner "
                                           "names (keys=...), or copy it here from the master's "
                                           "host (python -m actors keys --help)")


def load_keypair(directory: str | os.PathLike[str], role: str) -> KeyPair:
    _missing_folder(directory)
    path = Path(directory) / f"{role}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(str(path), f"cannot load secret key: {exc}") from None
    if secret is None:
        raise KeyFileError(str(path), "file holds no secret key")
    return KeyPair(public=public, secret=secret)


def load_public_key(directory: str | os.PathLike[str], role: str) -> bytes:
    _missing_folder(directory)
    path = Path(directory) / f"{role}.key"
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(str(path), f"cannot load public key: {exc}") from None
    return public
