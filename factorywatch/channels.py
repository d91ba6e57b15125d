"""Channel names: the ONE place a real system's tag name becomes a factorywatch channel name.

Real equipment names its signals ``Vibration1RMS``, ``Flow Rate``, ``Pump/Flow Rate``,
``Line1.Pump3.Temp [°C]``. factorywatch channel names are lower-case snake case
(``^[a-z][a-z0-9_]{0,63}$``, unit in the name). ``canonical`` maps the first to the second,
deterministically, and is used by CSV training, the wire decoder (schema version 2) and
Sparkplug metrics alike, so a model trained on a CSV's ``Volume Flow RateRMS`` column
scores live readings that carry ``Volume Flow RateRMS`` or ``volume_flow_rate_rms``.

The rules, in order:

1. Unicode is folded to ASCII (``µ`` -> ``u``, ``°`` dropped, accents dropped); ``%``
   becomes ``pct``.
2. CamelCase is split: ``Vibration1RMS`` -> ``Vibration1_RMS``, ``RMSValue`` -> ``RMS_Value``.
3. Lower case; every run of other characters (spaces, ``/``, ``.``, ``-``, brackets, ...)
   becomes one ``_``; leading and trailing ``_`` are dropped.
4. A name starting with a digit gets the prefix ``ch_``.
5. A name longer than 64 characters keeps its first 55 and ends with ``_`` plus 8 hex digits
   of the original name's SHA-1, so two long names stay apart.

Examples: ``Vibration1RMS`` -> ``vibration1_rms``, ``Flow Rate`` -> ``flow_rate``,
``Pump/Flow Rate`` -> ``pump_flow_rate``, ``Air temperature [K]`` -> ``air_temperature_k``,
``torque_nm`` -> ``torque_nm`` (a valid name maps to itself).

Two different names that map to the same channel in one message or one CSV (``Flow Rate``
and ``flow_rate``) are refused by ``map_names`` with both names in the error: data is never
silently merged.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

MAX_NAME_LENGTH: Final = 64
MAX_RAW_NAME_LENGTH: Final = 256
CHANNEL_PATTERN: Final = r"^[a-z][a-z0-9_]{0,63}$"
_VALID: Final = re.compile(CHANNEL_PATTERN)
_CAMEL_LOWER_UPPER: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_CAMEL_ACRONYM_END: Final = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_OTHER: Final = re.compile(r"[^a-z0-9]+")
_SPECIAL: Final = {"µ": "u", "μ": "u", "%": " pct ", "°": " "}
_HASH_DIGITS: Final = 8


class ChannelNameError(ValueError):
    """A name cannot become a channel name, or two names collide."""


@lru_cache(maxsize=8192)
def canonical(name: str) -> str:
    """The factorywatch channel name for a real system's tag ``name`` (see the module doc)."""
    if not isinstance(name, str):
        raise ChannelNameError(f"channel name must be a string, got {type(name).__name__}")
    if len(name) > MAX_RAW_NAME_LENGTH:
        raise ChannelNameError(f"channel name longer than {MAX_RAW_NAME_LENGTH} characters")
    if _VALID.match(name):
        return name
    text = "".join(_SPECIAL.get(ch, ch) for ch in name)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = _CAMEL_ACRONYM_END.sub("_", _CAMEL_LOWER_UPPER.sub("_", text))
    text = _OTHER.sub("_", text.lower()).strip("_")
    if not text:
        raise ChannelNameError(f"channel name {name!r} has no letters or digits")
    if text[0].isdigit():
        text = f"ch_{text}"
    if len(text) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:_HASH_DIGITS]
        text = f"{text[: MAX_NAME_LENGTH - _HASH_DIGITS - 1].rstrip('_')}_{digest}"
    return text


def map_names(names: Iterable[str]) -> dict[str, str]:
    """``{raw name: channel name}`` for ``names``; two names mapping to one channel fail."""
    mapping: dict[str, str] = {}
    owner: dict[str, str] = {}
    for raw in names:
        name = canonical(raw)
        if name in owner and owner[name] != raw:
            raise ChannelNameError(
                f"channel names {owner[name]!r} and {raw!r} both map to {name!r}; rename one"
            )
        owner[name] = raw
        mapping[raw] = name
    return mapping


def is_canonical(name: str) -> bool:
    """Whether ``name`` already is a valid channel name."""
    return bool(_VALID.match(name))
