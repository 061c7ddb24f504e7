"""The only package that imports zmq: sockets, the I/O thread, CURVE keys.

Nothing here knows about tasks; frames in, frames out.
"""

from transport.hub import ClientCurve, Hub, Outbox, ServerCurve
from transport.keys import KeyPair, ensure_keys, init_keys, load_keypair, load_public_key

__all__ = [
    "ClientCurve",
    "Hub",
    "KeyPair",
    "Outbox",
    "ServerCurve",
    "ensure_keys",
    "init_keys",
    "load_keypair",
    "load_public_key",
]
