"""A bounded cache of seen message ids, so redelivered readings are not scored twice."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class SeenCache:
    """Remembers the last ``capacity`` keys; ``capacity == 0`` disables de-duplication."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def seen(self, key: Hashable) -> bool:
        """Return True if ``key`` was seen before; otherwise remember it and return False."""
        if self.capacity == 0:
            return False
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._keys)
