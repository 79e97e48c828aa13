"""What a request's HTTP headers add to its body: a first-token deadline and a cache salt.

Both APIs turn headers into RequestTerms once, before validation, and every backend request
the body becomes carries them (best_of and `n` siblings included).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from tgserve.router.errors import ValidationError
from tgserve.router.types import ValidRequest

TIMEOUT_HEADER = "x-request-timeout"


@dataclass(frozen=True)
class RequestTerms:
    deadline: float | None = None  # time.monotonic() by which the first token must come
    key_salt: bytes = b""  # a digest of the request's API key (--cache-salt-from-api-key)

    def apply(self, request: ValidRequest) -> ValidRequest:
        salt = request.cache_salt
        if self.key_salt:
            # The key's digest has a fixed length: no key/salt pair can pass for another.
            salt = self.key_salt + salt
        return replace(request, deadline=self.deadline, cache_salt=salt)


NO_TERMS = RequestTerms()


def parse_timeout(value: str) -> float:
    """Seconds, a positive finite number (as the header and --request-timeout take it)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValidationError(
            f"`X-Request-Timeout` must be a positive number of seconds, got {value[:40]!r}"
        )
    return seconds


@dataclass(frozen=True)
class TermsPolicy:
    """The server's side: --request-timeout and --cache-salt-from-api-key."""

    default_timeout: float | None = None
    salt_from_key: bool = False

    def read(self, headers: Mapping[str, str], now: float | None = None) -> RequestTerms:
        """The header's timeout wins over the default; no timeout at all, no deadline."""
        given = headers.get(TIMEOUT_HEADER)
        timeout = parse_timeout(given) if given is not None else self.default_timeout
        start = time.monotonic() if now is None else now
        deadline = start + timeout if timeout is not None else None
        key_salt = b""
        if self.salt_from_key:
            token = headers.get("authorization", "").strip()
            key_salt = hashlib.blake2b(b"api-key\0" + token.encode("utf-8", "surrogatepass"),
                                       digest_size=16).digest()
        return RequestTerms(deadline, key_salt)
