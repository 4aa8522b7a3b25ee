"""Media types and content negotiation (RFC 9110 §8.3, §12.5.1), parsed properly and cached.

* ``parse_media_type("Application/JSON; charset=UTF-8")`` -> ``("application/json", {"charset": "UTF-8"})``;
  the type is lower-cased, parameters keep their values; ``None`` when it is not ``type/subtype``.
* ``parse_accept("text/csv;q=0.5, application/*")`` -> media ranges with their ``q`` weights;
  a range whose ``q`` is not a number in 0-1 is ignored; ``*`` alone means ``*/*``.
* ``acceptable(ranges, offers, default)``: the offers the client takes, best first. Each offer
  gets the ``q`` of the most specific range matching it (``type/subtype`` > ``type/*`` > ``*/*``);
  ``q=0`` excludes it; ties go to ``default``, then to the offers' order. No ``Accept`` header
  (or an empty one) accepts everything, ``default`` first.
* ``preferred(ranges, default, offers)``: the single concrete type to hand a user ``output_fn``,
  which can produce anything: the client's best concrete type, or ``default`` for ``*/*``.

Results are memoised per header string (bounded), because clients send the same few headers.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Sequence

from trainenv.frozen import frozen

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+"
_TYPE = re.compile(rf"\s*({_TOKEN})/({_TOKEN})\s*")
_PARAM = re.compile(rf';\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})\s*')
_CACHE_LIMIT = 512


@frozen
class MediaRange:
    """One range of an ``Accept`` header: ``type/subtype``, its ``q`` weight and its position."""

    type: str
    subtype: str
    q: float
    order: int

    @property
    def specificity(self) -> int:
        return 0 if self.type == "*" else (1 if self.subtype == "*" else 2)

    def matches(self, media_type: str) -> bool:
        if self.type == "*":
            return True
        main, _, sub = media_type.partition("/")
        return self.type == main and (self.subtype == "*" or self.subtype == sub)


_media_cache: dict[str, tuple[str, dict[str, str]] | None] = {}
_accept_cache: dict[str, tuple[MediaRange, ...]] = {}


def _params(text: str, start: int) -> dict[str, str] | None:
    params: dict[str, str] = {}
    pos = start
    while pos < len(text):
        match = _PARAM.match(text, pos)
        if match is None:
            return None
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
        pos = match.end()
    return params


def parse_media_type(value: str) -> tuple[str, dict[str, str]] | None:
    """``(type/subtype lower-cased, parameters)``, or ``None`` when ``value`` is not a media type."""
    try:
        return _media_cache[value]
    except KeyError:
        pass
    match = _TYPE.match(value)
    result: tuple[str, dict[str, str]] | None = None
    if match is not None:
        params = _params(value.rstrip(), match.end())
        if params is not None:
            result = (f"{match.group(1)}/{match.group(2)}".lower(), params)
    if len(_media_cache) >= _CACHE_LIMIT:
        _media_cache.clear()
    _media_cache[value] = result
    return result


def parse_accept(header: str) -> tuple[MediaRange, ...]:
    """The media ranges of an ``Accept`` header, in the order given; bad ranges are left out."""
    try:
        return _accept_cache[header]
    except KeyError:
        pass
    ranges: list[MediaRange] = []
    for order, part in enumerate(header.split(",")):
        part = part.strip()
        if not part:
            continue
        if part == "*" or part.startswith("*;"):
            part = "*/*" + part[1:]
        parsed = parse_media_type(part)
        if parsed is None:
            continue
        media_type, params = parsed
        main, _, sub = media_type.partition("/")
        if main == "*" and sub != "*":
            continue
        q = 1.0
        if "q" in params:
            try:
                q = float(params["q"])
            except ValueError:
                continue
            if not 0.0 <= q <= 1.0:
                continue
        ranges.append(MediaRange(main, sub, q, order))
    result = tuple(ranges)
    if len(_accept_cache) >= _CACHE_LIMIT:
        _accept_cache.clear()
    _accept_cache[header] = result
    return result


def _quality(ranges: Sequence[MediaRange], media_type: str) -> float:
    best: MediaRange | None = None
    for media_range in ranges:
        if media_range.matches(media_type) and (best is None or media_range.specificity > best.specificity):
            best = media_range
    return 0.0 if best is None else best.q


def acceptable(header: str | None, offers: Sequence[str], default: str) -> list[str]:
    """The ``offers`` the client accepts, best first (see the module docstring)."""
    if header is None or not header.strip():
        return sorted(offers, key=lambda o: o != default)
    ranges = parse_accept(header)
    if not ranges:
        return []
    scored = []
    for index, offer in enumerate(offers):
        q = _quality(ranges, offer)
        if q > 0.0:
            scored.append((-q, offer != default, index, offer))
    scored.sort()
    return [offer for *_, offer in scored]


def preferred(header: str | None, default: str, offers: Sequence[str] = ()) -> str | None:
    """One concrete type for a user ``output_fn``: the client's best, ``default`` for ``*/*``.

    ``type/*`` resolves to ``default`` when it matches, else to the first matching offer.
    ``None`` when the client accepts nothing usable (e.g. only ``image/*`` and no image offer).
    """
    if header is None or not header.strip():
        return default
    ranges = parse_accept(header)
    if not ranges:
        return None
    ordered = sorted(ranges, key=lambda r: (-r.q, -r.specificity, r.order))
    for media_range in ordered:
        if media_range.q <= 0.0:
            break
        if media_range.specificity == 2:
            return f"{media_range.type}/{media_range.subtype}"
        if media_range.matches(default) and _quality(ranges, default) > 0.0:
            return default
        for offer in offers:
            if media_range.matches(offer) and _quality(ranges, offer) > 0.0:
                return offer
    return None
