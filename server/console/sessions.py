"""Signed session cookies and CSRF tokens.

A session cookie is `base64url(json) "." hmac-sha256(secret, that)`: the operator's name,
a random session id, the expiry, and a fingerprint of the operator's token (so rotating a
token or removing the operator from console.toml ends their sessions). It never holds the
token itself. Cookies are HttpOnly, SameSite=Strict, Path=/, and Secure when the console
serves HTTPS.

CSRF: every state-changing request (every POST) carries `csrf`, HMAC(secret, "csrf:" +
session id), checked in constant time. Before sign-in, a random pre-session cookie plays
the session id's part, so a sign-in form cannot be posted from another site either.
Signing out revokes the session id (kept in memory until it would have expired anyway).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass

SESSION_COOKIE = "fr_session"
PRE_COOKIE = "fr_pre"
PRE_TTL_S = 3600


@dataclass(frozen=True)
class Session:
    operator: str
    sid: str
    expires: float
    fingerprint: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, secret: bytes, ttl_s: int) -> None:
        self._key = hashlib.sha256(b"fedretrieve-console-session:" + secret).digest()
        self.ttl_s = ttl_s
        self._revoked: dict[str, float] = {}
        self._lock = threading.Lock()

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    # ---------------------------------------------------------------- sessions
    def issue(self, operator: str, fingerprint: str) -> tuple[Session, str]:
        session = Session(
            operator, secrets.token_urlsafe(18), time.time() + self.ttl_s, fingerprint
        )
        body = {"op": operator, "sid": session.sid, "exp": int(session.expires), "fp": fingerprint}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return session, f"{payload}.{self._mac(payload)}"

    def verify(self, cookie: str | None) -> Session | None:
        if not cookie or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            body = json.loads(_unb64(payload))
            session = Session(
                str(body["op"]), str(body["sid"]), float(body["exp"]), str(body["fp"])
            )
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires < time.time():
            return None
        with self._lock:
            if session.sid in self._revoked:
                return None
        return session

    def revoke(self, session: Session) -> None:
        now = time.time()
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            self._revoked[session.sid] = session.expires

    # ---------------------------------------------------------------- CSRF
    def csrf_for(self, sid: str) -> str:
        return self._mac("csrf:" + sid)

    def check_csrf(self, sid: str | None, token: str | None) -> bool:
        if not sid or not token:
            return False
        return hmac.compare_digest(token, self.csrf_for(sid))

    @staticmethod
    def new_pre_session() -> str:
        return secrets.token_urlsafe(18)


class SignInThrottle:
    """At most `limit` failed sign-ins per client address per minute."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(address, []) if now - t < self.window_s]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def blocked(self, address: str) -> bool:
        with self._lock:
            return len(self._recent(address, time.monotonic())) >= self.limit

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(address, now)
            self._failures.setdefault(address, []).append(now)
