"""Bounded caches of seen reading ids and their verdicts: a redelivered reading is not scored
twice, and a reading sent again is answered with the verdict it already got."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Literal

Seen = Literal["new", "duplicate", "conflict"]


class SeenCache:
    """Remembers the last ``capacity`` ids with a digest of their content.

    ``capacity == 0`` disables de-duplication. A digest of 0 means "content unknown" and
    matches any content.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, int] = OrderedDict()

    def check(self, key: Hashable, digest: int = 0) -> Seen:
        """Classify ``key`` and remember it: new, a duplicate, or the same id with new content.

        A conflicting id keeps its first content: the reading already answered stays the one
        that counts.
        """
        if self.capacity == 0:
            return "new"
        known = self._keys.get(key)
        if known is not None:
            self._keys.move_to_end(key)
            return "duplicate" if known in (0, digest) or digest == 0 else "conflict"
        self.add(key, digest)
        return "new"

    def seen(self, key: Hashable) -> bool:
        """Return True if ``key`` was seen before; otherwise remember it and return False."""
        return self.check(key) != "new"

    def forget(self, key: Hashable) -> None:
        """Forget ``key``: its next arrival is new again (its answer was never delivered)."""
        self._keys.pop(key, None)

    def add(self, key: Hashable, digest: int = 0) -> None:
        """Remember ``key`` (the oldest id falls out past ``capacity``)."""
        if self.capacity == 0:
            return
        self._keys[key] = digest
        self._keys.move_to_end(key)
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def items(self) -> Iterator[tuple[Hashable, int]]:
        """The remembered ids and digests, oldest first."""
        return iter(self._keys.items())

    def __len__(self) -> int:
        return len(self._keys)


class AnswerCache:
    """The verdicts last given, by reading id: ``capacity`` of them, the oldest forgotten.

    A reading sent again by its sensor (which never heard the verdict: the broker may have lost
    it after the detector's publish was confirmed) is a duplicate, not scored twice; the
    engine answers it with the verdict's exact bytes from here. ``capacity == 0`` keeps none.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._answers: OrderedDict[Hashable, tuple[str, bytes]] = OrderedDict()

    def put(self, key: Hashable, topic: str, payload: bytes) -> None:
        """Remember the verdict published for ``key``."""
        if self.capacity == 0:
            return
        self._answers[key] = (topic, payload)
        self._answers.move_to_end(key)
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)

    def get(self, key: Hashable) -> tuple[str, bytes] | None:
        """The verdict given for ``key`` (topic, payload), if still remembered."""
        return self._answers.get(key)

    def forget(self, key: Hashable) -> None:
        """Forget ``key``'s verdict (its publish was refused: the reading is scored again)."""
        self._answers.pop(key, None)

    def clear(self) -> None:
        """Forget every verdict."""
        self._answers.clear()

    def __len__(self) -> int:
        return len(self._answers)
