"""Percent-encoding of file-sync metadata values (sans-IO).

BuildKit 0.12 and later (dockerd 23+, measured on 26.1) send the values of a metadata key such as
``exclude-patterns`` or ``followpaths`` escaped when any of them is non-ASCII: every value of that key goes
through Go's ``url.QueryEscape`` and the marker ``<key>-encoded: 1`` is added. Keys whose values are all
ASCII go out raw, even when they hold ``%`` or ``+``. A receiver decodes a key's values only when its marker
parses as true (Go ``strconv.ParseBool``); dockerd 20.10 never sends the marker, so decoding is always safe.
"""

from __future__ import annotations

from urllib.parse import quote_plus

ENCODED_SUFFIX = "-encoded"
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_HEX = "0123456789abcdefABCDEF"


def needs_encoding(values: list[str]) -> bool:
    return any(ord(ch) > 0x7F for value in values for ch in value)


def query_escape(value: str) -> str:
    """Go's url.QueryEscape: everything but [A-Za-z0-9-_.~] as %XX of the UTF-8 bytes, space as '+'."""
    return quote_plus(value, safe="")


def query_unescape(value: str) -> str:
    """Go's url.QueryUnescape, whose error BuildKit ignores: a malformed escape yields ''."""
    out = bytearray()
    i = 0
    raw = value.encode("utf-8", "surrogateescape")
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25:  # %
            pair = raw[i + 1:i + 3].decode("latin-1")
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                return ""
            out.append(int(pair, 16))
            i += 3
            continue
        out.append(0x20 if byte == 0x2B else byte)  # '+' is a space in a query component
        i += 1
    return out.decode("utf-8", "surrogateescape")


def encode(metadata: dict[str, list[str]]) -> dict[str, list[str]]:
    """What a generation n+1 daemon sends for these keys: escaped keys gain their ``-encoded`` marker."""
    out: dict[str, list[str]] = {}
    for key, values in metadata.items():
        if needs_encoding(values):
            out[key] = [query_escape(value) for value in values]
            out[key + ENCODED_SUFFIX] = ["1"]
        else:
            out[key] = list(values)
    return out


def is_encoded(metadata: dict[str, list[str]], key: str) -> bool:
    marker = metadata.get(key + ENCODED_SUFFIX) or []
    return bool(marker) and marker[0] in _TRUE


def decode_values(metadata: dict[str, list[str]], key: str) -> list[str]:
    """The values of key as the sender meant them (unescaped when its marker says so)."""
    values = metadata.get(key) or []
    if is_encoded(metadata, key):
        return [query_unescape(value) for value in values]
    return list(values)
