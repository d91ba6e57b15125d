"""Server-side web sessions and login throttling (pure: ids and the time are passed in).

The browser holds only a random session id; who it is and with which role lives here, so a
session ends for good at logout, when the user is removed from the broker's accounts, when
the password or the role changes (the app checks each session against
:meth:`factorywatch.web.auth.Accounts.current` on every request), and after its age limits.

:class:`LoginThrottle` counts failed logins per user name (known or not, so a lockout tells
nothing about which accounts exist) and per client address; past the limit, every attempt
is refused until the lockout ends, the right password included.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

MAX_AGE_S: Final = 12 * 3600.0  # a session ends this long after login, however busy
IDLE_S: Final = 2 * 3600.0  # ... or after this long without a request
MAX_SESSIONS: Final = 10_000  # the oldest goes first beyond this (memory stays bounded)
FAILURES_PER_USER: Final = 5
FAILURES_PER_CLIENT: Final = 20
FAILURE_WINDOW_S: Final = 300.0
LOCKOUT_S: Final = 300.0
_MAX_TRACKED: Final = 10_000  # user names / addresses with recent failures kept in memory


@dataclass
class Session:
    """One logged-in browser."""

    user: str
    role: str
    fingerprint: str  # of the password entry at login (see auth.Identity)
    created: float
    last_used: float


class SessionBook:
    """Sessions by id, with absolute and idle expiry and a bound on their number."""

    def __init__(
        self, *, max_age_s: float = MAX_AGE_S, idle_s: float = IDLE_S, limit: int = MAX_SESSIONS
    ) -> None:
        self.max_age_s, self.idle_s, self.limit = max_age_s, idle_s, limit
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, sid: str, user: str, role: str, fingerprint: str, now: float) -> Session:
        """Start a session under the (fresh, random) id ``sid``."""
        session = Session(user, role, fingerprint, now, now)
        self._by_id[sid] = session
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)
        return session

    def get(self, sid: str, now: float) -> Session | None:
        """The live session ``sid`` (touched), or None when unknown or expired."""
        session = self._by_id.get(sid)
        if session is None:
            return None
        if now - session.created > self.max_age_s or now - session.last_used > self.idle_s:
            del self._by_id[sid]
            return None
        session.last_used = now
        return session

    def close(self, sid: str) -> bool:
        """End one session (logout); True when it existed."""
        return self._by_id.pop(sid, None) is not None

    def revoke_user(self, user: str) -> int:
        """End every session of ``user``; how many there were."""
        gone = [sid for sid, s in self._by_id.items() if s.user == user]
        for sid in gone:
            del self._by_id[sid]
        return len(gone)


class LoginThrottle:
    """Failed logins per user name and per client address, with a lockout past the limit."""

    def __init__(
        self,
        *,
        per_user: int = FAILURES_PER_USER,
        per_client: int = FAILURES_PER_CLIENT,
        window_s: float = FAILURE_WINDOW_S,
        lockout_s: float = LOCKOUT_S,
    ) -> None:
        self.per_user, self.per_client = per_user, per_client
        self.window_s, self.lockout_s = window_s, lockout_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}

    def locked_for(self, user: str, client: str, now: float) -> float:
        """Seconds until ``user`` may try again from ``client`` (0: may try now)."""
        left = 0.0
        for key in (f"u:{user}", f"c:{client}"):
            until = self._locked_until.get(key)
            if until is None:
                continue
            if until <= now:
                del self._locked_until[key]
                self._failures.pop(key, None)
            else:
                left = max(left, until - now)
        return left

    def failed(self, user: str, client: str, now: float) -> None:
        """Count one failed login."""
        for key, limit in ((f"u:{user}", self.per_user), (f"c:{client}", self.per_client)):
            times = self._failures.pop(key, None) or deque(maxlen=limit)
            while times and now - times[0] > self.window_s:
                times.popleft()
            times.append(now)
            self._failures[key] = times  # most recent last: the oldest are forgotten first
            if len(times) >= limit:
                self._locked_until[key] = now + self.lockout_s
        while len(self._failures) > _MAX_TRACKED:
            self._failures.popitem(last=False)
        if len(self._locked_until) > _MAX_TRACKED:
            for key in [k for k, until in self._locked_until.items() if until <= now]:
                del self._locked_until[key]

    def succeeded(self, user: str) -> None:
        """A right password (outside a lockout): the user's failures are forgotten."""
        self._failures.pop(f"u:{user}", None)
