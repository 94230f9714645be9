"""JSON for the CNI hot path without importing `json`.

`import json` pulls in `re` and costs ~8 ms of a ~20 ms plugin run; the C
accelerator `_json` that it wraps costs 0.5 ms. Only errors fall back to the
`json` package (for its messages), and errors are not on the fast path.
"""
from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

__all__ = ["loads", "dumps", "JSONError"]


class JSONError(ValueError):
    pass


_INF = float("inf")


class _Context:
    # The attributes _json.make_scanner reads from its context object.
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_int = int
    memo = None

    @staticmethod
    def parse_constant(name: str) -> NoReturn:
        raise JSONError("invalid JSON constant %s" % name)

    @staticmethod
    def parse_float(text: str) -> float:
        # As Go: a number too large for a float64 is an error, not infinity
        # (which dumps could not write back).
        value = float(text)
        if value == _INF or value == -_INF:
            raise JSONError("number %s out of range" % text)
        return value


# typeshed declares make_scanner's context as a make_scanner itself (a TODO there: it is
# duck-typed, only the attributes above are read), so a plain class cannot satisfy it.
_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]
_WS = " \t\n\r"


def loads(data: str | bytes | bytearray, allow_surrogates: bool = False) -> Any:
    """Parse a JSON document (str or bytes) into Python objects.

    A string with a lone surrogate is an error (allow_surrogates=True: kept, for
    reading what a broken document says, e.g. the cniVersion of an error answer)."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError("input is not UTF-8: %s" % e) from None
    text = data.strip(_WS)
    if not text:
        raise JSONError("unexpected end of JSON input")
    try:
        obj, end = _scan_text(text)
    except SystemError:
        # The C scanner builds its errors from json.decoder.JSONDecodeError but
        # only looks for it in sys.modules: until something imports json.decoder
        # a malformed document ends in "SystemError: returned NULL without
        # setting an exception". Errors are off the fast path: import it, rescan.
        import json.decoder  # noqa: F401
        obj, end = _scan_text(text)
    if end != len(text):
        raise JSONError("invalid character after top-level value at offset %d" % end)
    # Only a \\uD800-\\uDFFF escape can leave a lone surrogate (the UTF-8 decoder refuses
    # encoded ones): such a string is not Unicode text, and could never be printed again.
    if not allow_surrogates and ("\\ud" in text or "\\uD" in text):
        bad = unencodable(obj)
        if bad is not None:
            raise JSONError("invalid Unicode at %s: a lone surrogate (a \\uD800-\\uDFFF escape "
                            "that is not half of a pair)" % ascii(bad[0])[1:-1][:200])
    return obj


def unencodable(obj: object, where: str = "") -> tuple[str, str] | None:
    """(path, text) of the first string of `obj` (a key or a value, at a path like
    "ipam.ranges[0][0].subnet" under `where`) that cannot be encoded as UTF-8 (a lone
    surrogate, which JSON's \\uD800 escapes can make, and which neither a file name nor
    an answer can hold); None if there is none. Iterative: documents nest as deep as the
    scanner allows."""
    stack: list[tuple[object, str]] = [(obj, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "the top level", item
        elif isinstance(item, dict):
            for key, value in item.items():
                inner = "%s.%s" % (path, key) if path else key
                if isinstance(key, str) and not key.isascii():
                    try:
                        key.encode("utf-8")
                    except UnicodeEncodeError:
                        return "a key in %s" % (path or "the top level"), key
                stack.append((value, inner))
        elif isinstance(item, list):
            stack.extend((v, "%s[%d]" % (path, i)) for i, v in enumerate(item))
    return None


def _scan_text(text: str) -> tuple[Any, int]:
    try:
        return _scan(text, 0)
    except StopIteration as stop:
        raise JSONError("invalid character at offset %d" % stop.value) from None
    except JSONError:
        raise
    except RecursionError:
        raise JSONError("exceeded max nesting depth") from None
    except ValueError as e:  # json.decoder.JSONDecodeError from the C scanner
        raise JSONError(str(e)) from None


_quote = _json.encode_basestring
_quote_ascii = _json.encode_basestring_ascii


def dumps(obj: object, indent: int | None = None, ascii: bool = False) -> str:
    """Serialise dicts, lists, str, int, float, bool and None.

    With indent (an int), output matches Go's json.MarshalIndent layout, which
    is what the reference plugins print. ascii=True escapes every non-ASCII
    character (\\uXXXX), so even a string that is not valid Unicode (a lone
    surrogate) gives a document that encodes.
    """
    out: list[str] = []
    _encode(obj, out, indent, 0, _quote_ascii if ascii else _quote)
    return "".join(out)


def _encode(obj: object, out: list[str], indent: int | None, level: int,
            quote: Callable[[str], str] = _quote) -> None:
    if isinstance(obj, str):
        out.append(quote(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise JSONError("cannot encode %r" % obj)
        out.append(float.__repr__(obj))
    elif isinstance(obj, dict):
        if not obj:
            out.append("{}")
            return
        out.append("{")
        first = True
        for key, value in obj.items():
            if not isinstance(key, str):
                raise JSONError("object keys must be strings, not %r" % (key,))
            if not first:
                out.append(",")
            first = False
            if indent is not None:
                out.append("\n" + " " * (indent * (level + 1)))
            out.append(quote(key))
            out.append(": " if indent is not None else ":")
            _encode(value, out, indent, level + 1, quote)
        if indent is not None:
            out.append("\n" + " " * (indent * level))
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        if not obj:
            out.append("[]")
            return
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            if indent is not None:
                out.append("\n" + " " * (indent * (level + 1)))
            _encode(value, out, indent, level + 1, quote)
        if indent is not None:
            out.append("\n" + " " * (indent * level))
        out.append("]")
    else:
        raise JSONError("cannot encode object of type %s" % type(obj).__name__)
