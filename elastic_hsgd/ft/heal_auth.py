"""The heal transport's proofs: HMAC-SHA256 with the secret every replica group of a job shares.

A joiner asks for ``GET /heal/<step>`` with a fresh random nonce and
``HMAC(secret, "elastic_hsgd.heal.request/1", step, nonce)``. The server answers
only a valid proof, and each nonce once, so a captured request is worth nothing
for another step or a second download. The reply's body is followed by
``HMAC(secret, "elastic_hsgd.heal.reply/1", step, nonce, source group, body
length, body)``, computed while the body streams out; the joiner checks it over
the whole body before decoding a byte. Bound to the request's nonce, an old
reply cannot be replayed either.

Example::

    >>> secret = b"0123456789abcdef0123456789abcdef"
    >>> nonce = new_nonce()
    >>> check_request(secret, 7, nonce, request_proof(secret, 7, nonce))
    True
    >>> check_request(secret, 8, nonce, request_proof(secret, 7, nonce))   # another step
    False
    >>> mac = reply_mac(secret, 7, nonce, "0", 3)
    >>> mac.update(b"abc")
    >>> len(mac.digest()) == TAG_BYTES
    True
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict

NONCE_HEADER = "X-Heal-Nonce"
PROOF_HEADER = "X-Heal-Proof"
NONCE_BYTES = 16
#: Bytes of the HMAC-SHA256 tag that follows a reply's body.
TAG_BYTES = 32
_REQUEST = "elastic_hsgd.heal.request/1"
_REPLY = "elastic_hsgd.heal.reply/1"


def new_nonce() -> str:
    """A fresh random nonce, as hex (one per request)."""
    return secrets.token_hex(NONCE_BYTES)


def _is_hex(text: str, nbytes: int) -> bool:
    return len(text) == 2 * nbytes and all(c in "0123456789abcdef" for c in text)


def request_proof(secret: bytes, step: int, nonce: str) -> str:
    """The joiner's proof for ``GET /heal/<step>`` with ``nonce``, as hex."""
    return hmac.new(secret, f"{_REQUEST}\n{step}\n{nonce}".encode(), hashlib.sha256).hexdigest()


def check_request(secret: bytes, step: int, nonce: str, proof: str) -> bool:
    """Whether ``proof`` is the valid proof for ``step`` and ``nonce`` (compared in constant time)."""
    if not _is_hex(nonce, NONCE_BYTES) or not _is_hex(proof, hashlib.sha256().digest_size):
        return False
    return hmac.compare_digest(request_proof(secret, step, nonce), proof)


def reply_mac(secret: bytes, step: int, nonce: str, replica_group: str, body_bytes: int) -> "hmac.HMAC":
    """The reply's HMAC with everything but the body absorbed; feed it the body, then take ``digest()``."""
    prefix = f"{_REPLY}\n{step}\n{nonce}\n{replica_group}\n{body_bytes}\n".encode()
    return hmac.new(secret, prefix, hashlib.sha256)


class SeenNonces:
    """The last ``capacity`` nonces accepted: a request that repeats one is a replay."""

    def __init__(self, capacity: int = 4096) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def first_use(self, nonce: str) -> bool:
        """Record ``nonce``; ``False`` if it was already used."""
        if nonce in self._seen:
            return False
        self._seen[nonce] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True
