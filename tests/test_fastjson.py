"""cni.fastjson against the standard `json` module as the oracle.

hypothesis is not in the venv (and the project adds no dependencies for it),
so the property tests use a seeded random document generator instead: every
run checks the same few thousand documents, and a failure names its seed.
"""
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest

from cni import fastjson
from cni.fastjson import JSONError, dumps, loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCUMENTS = [
    {},
    [],
    "",
    0,
    -0,
    1,
    -1,
    2 ** 63,
    -(2 ** 63) - 1,
    10 ** 40,
    1.5,
    -2.25,
    1e-7,
    1.7976931348623157e308,
    5e-324,
    0.1,
    True,
    False,
    None,
    "plain",
    "quote \" backslash \\ slash / tab \t newline \n cr \r bs \b ff \f",
    "control \x00 \x01 \x1f \x7f",
    "unicode é ß 中文 emoji \U0001F600 nbsp \u00a0 ls \u2028 ps \u2029",
    {"": ""},
    {"a": {"b": {"c": {"d": [1, [2, [3, [4, []]]]]}}}},
    [{}, [], {"x": []}, [{}], "", 0, None],
    {"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni0",
     "isGateway": True, "ipMasq": False, "mtu": 1450,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
              "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}]},
     "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
     "args": {"cni": {"ips": ["10.244.1.7/24"]}}},
    {"ünïcödé kéy": "välue", "key with \"quotes\"": "\\"},
]

TEXTS = [
    '{"a":1}',
    ' \t\n\r{"a" : [ 1 , 2 ] }\n',
    '[1e3, 1E3, 1e+3, 1e-3, -0.5e-2, 0e0, -0, 123456789012345678901234567890]',
    '"\\u00e9\\u4e2d\\ud83d\\ude00\\n\\t\\"\\\\\\/\\b\\f\\r"',
    '{"dup": 1, "dup": 2}',
    '[true,false,null]',
]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=range(len(DOCUMENTS)))
def test_round_trip_matches_json(doc):
    compact = dumps(doc)
    assert compact == json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    assert loads(compact) == doc
    assert json.loads(compact) == doc
    pretty = dumps(doc, indent=4)
    assert pretty == json.dumps(doc, indent=4, ensure_ascii=False)
    assert loads(pretty) == doc
    assert loads(json.dumps(doc)) == doc                      # ensure_ascii escapes
    assert loads(json.dumps(doc, ensure_ascii=False).encode()) == doc   # bytes input


@pytest.mark.parametrize("text", TEXTS)
def test_loads_matches_json(text):
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)
    assert loads(bytearray(text.encode())) == json.loads(text)


def test_number_types():
    assert type(loads("1")) is int
    assert type(loads("1.0")) is float
    assert type(loads("1e2")) is float
    assert loads("-0") == 0 and type(loads("-0")) is int
    assert math.copysign(1, loads("-0.0")) == -1
    assert loads(str(10 ** 30)) == 10 ** 30
    assert dumps(-0.0) == "-0.0"
    assert dumps(1e16) == json.dumps(1e16)
    assert dumps(True) == "true" and dumps(1) == "1"     # bool is not printed as an int


def test_tuples_are_lists():
    assert dumps((1, (2, "x"))) == "[1,[2,\"x\"]]"
    assert dumps({"a": ()}, indent=4) == json.dumps({"a": []}, indent=4)


def test_indent_layout_is_go_marshalindent():
    # What the reference plugins print: 4 spaces, ": " after keys, empty {} / [].
    assert dumps({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "dns": {}},
                 indent=4) == (
        '{\n'
        '    "cniVersion": "1.0.0",\n'
        '    "ips": [\n'
        '        {\n'
        '            "address": "10.0.0.2/24"\n'
        '        }\n'
        '    ],\n'
        '    "dns": {}\n'
        '}')


# --- property test: random documents ------------------------------------------------

_ALPHABET = ("abcXYZ019 _-./:\"\\\b\f\n\r\t\x00\x01\x1f\x7féß中\u2028\U0001F600")


def _random_string(rng):
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 12)))


def _random_number(rng):
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randrange(-10, 10)
    if kind == 1:
        return rng.randrange(-(2 ** 70), 2 ** 70)
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-300, 1e300, -1.5e-10, 2.5e22, 5e-324])
    if kind == 4:
        return math.ldexp(rng.random(), rng.randrange(-1000, 1000))
    return rng.choice([True, False, None])


def _random_doc(rng, depth=0):
    kind = rng.randrange(4 if depth < 5 else 2)
    if kind == 0:
        return _random_string(rng)
    if kind == 1:
        return _random_number(rng)
    if kind == 2:
        return [_random_doc(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {_random_string(rng): _random_doc(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


@pytest.mark.parametrize("seed", range(20))
def test_random_documents_match_json(seed):
    rng = random.Random(seed)
    for _ in range(100):
        doc = _random_doc(rng)
        compact = dumps(doc)
        assert compact == json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        assert dumps(doc, indent=4) == json.dumps(doc, indent=4, ensure_ascii=False)
        assert dumps(doc, indent=2) == json.dumps(doc, indent=2, ensure_ascii=False)
        assert loads(compact) == doc
        assert loads(json.dumps(doc)) == doc
        assert loads(json.dumps(doc, indent=1).encode()) == doc


# --- errors ----------------------------------------------------------------------

BAD = [
    "",
    "   \n\t",
    "{",
    "}",
    "[1,]",
    '{"a":1,}',
    '{"a" 1}',
    "{a:1}",
    "{'a':1}",
    '"abc',
    '"\\x41"',
    '"\\u12"',
    '"tab\tinside"',              # raw control characters are not allowed in strings
    '"nl\ninside"',
    "01",
    "1.",
    ".5",
    "+1",
    "-",
    "1e",
    "0x10",
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    '{"a": NaN}',
    "[Infinity]",
    "1e400",                      # overflows float64: an error in Go, not inf
    "[-1e999]",
    "tru",
    "True",
    "None",
    "null null",
    "[1] x",
    '{"a":1}}',
    "[1]garbage",
    "1 2",
    "\ufeff{}",                   # BOM: Go rejects it too
    "[" * 100000,                 # nesting deeper than the recursion limit
    "1" * 5000,                   # longer than int()'s digit limit
]


@pytest.mark.parametrize("text", BAD, ids=[repr(t)[:30] for t in BAD])
def test_bad_documents_raise_jsonerror(text):
    with pytest.raises(JSONError):
        loads(text)
    with pytest.raises(JSONError):
        loads(text.encode())
    assert issubclass(JSONError, ValueError)


@pytest.mark.parametrize("raw", [b"\xff", b'"\xc3\x28"', b'{"a":"\xed\xa0\x80"}',
                                 b'"\xf8\x88\x80\x80\x80"', b"\x80{}"])
def test_invalid_utf8_raises_jsonerror(raw):
    with pytest.raises(JSONError, match="UTF-8"):
        loads(raw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"),
                                   [1, float("nan")], {"a": {"b": float("inf")}}])
def test_dumps_rejects_nan_and_infinity(value):
    with pytest.raises(JSONError):
        dumps(value)
    with pytest.raises(JSONError):
        dumps(value, indent=4)


@pytest.mark.parametrize("value", [{1: "a"}, {None: 1}, {("t",): 1}, {1.5: 2}])
def test_dumps_rejects_non_string_keys(value):
    # json.dumps would coerce these; a CNI document never has them, so it is a bug.
    with pytest.raises(JSONError):
        dumps(value)


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", 1j, {"a": [object()]}])
def test_dumps_rejects_other_types(value):
    with pytest.raises(JSONError):
        dumps(value)


def _fresh_python(code):
    """Run code in a new interpreter that has never imported json (as a plugin)."""
    return subprocess.run([sys.executable, "-I", "-S", "-c",
                           "import sys; sys.path.insert(0, %r)\n" % ROOT + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)


def test_errors_without_json_imported():
    """Regression: the C scanner looks up json.decoder.JSONDecodeError in sys.modules
    only; in a plugin process (json never imported) malformed documents used to raise
    SystemError ("returned NULL without setting an exception"), a 999 instead of 6."""
    proc = _fresh_python("""
        import sys
        from cni.fastjson import JSONError, loads
        assert "json" not in sys.modules and "json.decoder" not in sys.modules
        assert loads(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
        assert "json" not in sys.modules, "the fast path imported json"
        for bad in ['{"a" 1}', '"abc', '{"a":1,}', '"\\x01"', '[1,', '{"a":}']:
            try:
                loads(bad)
            except JSONError as e:
                print(type(e).__name__, e)
            else:
                raise SystemExit("accepted %r" % bad)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6
    assert all(line.startswith("JSONError ") for line in lines)
    assert "delimiter" in lines[0] and "Unterminated string" in lines[1]


def test_import_is_light():
    proc = _fresh_python("""
        import sys
        before = set(sys.modules)
        import cni.fastjson
        heavy = {"json", "re", "enum", "typing", "subprocess", "ipaddress", "socket"}
        print(sorted(heavy & (set(sys.modules) - before)))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_module_exports():
    assert set(fastjson.__all__) == {"loads", "dumps", "JSONError"}


# --- lone surrogates: valid JSON grammar, not Unicode text ---------------------------

@pytest.mark.parametrize("text", [
    '"\\ud800"', '"\\uDFFF"', '{"a\\udc00": 1}', '[1, {"b": ["x", "y\\udbff"]}]',
    '"\\ude00\\ud83d"',                       # a pair in the wrong order is two lone halves
    '"\\ud83d"', '"abc\\ud83dx"', '{"k": {"k": {"k": "\\ud800"}}}',
    '[' * 900 + '"\\ud800"' + ']' * 900,      # deep: found without recursion
])
def test_loads_refuses_lone_surrogates(text):
    """Regression: "\\ud800" decoded to a str that cannot be encoded again, so any
    plugin echoing it (a name, a path, an error message) crashed on output."""
    for data in (text, text.encode()):
        with pytest.raises(JSONError, match="lone surrogate") as e:
            loads(data)
        str(e.value).encode("utf-8")          # the message itself can be printed


def test_loads_keeps_surrogate_pairs_and_escaped_backslashes():
    assert loads('"\\ud83d\\ude00"') == "\U0001F600"
    assert loads('"\\\\ud800"') == "\\ud800"                  # a backslash, then text
    assert loads('{"\\ud83d\\ude00": ["\\\\uDFFF"]}') == {"\U0001F600": ["\\uDFFF"]}


def test_dumps_ascii_escapes_what_utf8_cannot_carry():
    doc = {"msg": "bad \ud800 and \udcff, fine \u00e9 \U0001F600"}
    with pytest.raises(UnicodeEncodeError):
        dumps(doc).encode()
    text = dumps(doc, indent=4, ascii=True)
    assert text.isascii() and json.loads(text) == doc
    assert text == json.dumps(doc, indent=4)
    assert dumps(doc, ascii=True) == json.dumps(doc, separators=(",", ":"))
