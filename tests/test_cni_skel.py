"""cni.skel (environment, validation, dispatch), cni.invoke (finding and delegating
to plugins), cni.executable (the installed scripts) and podnet.proc (running
programs). No root needed.

The "external plugins" here are test doubles: tiny shell scripts written into
tmp_path that record their environment and stdin and print a canned result or
error, standing in for a Go plugin such as the reference host-local. The
in-process path uses a fake plugin module written into tmp_path, installed with
cni.executable.install exactly as podnet's own plugins are.
"""
import os
import sys
import textwrap
import uuid

import pytest

from cni import errors, executable, invoke, skel
from cni.errors import CNIError
from cni.fastjson import dumps, loads
from cni.skel import CmdArgs, args_from_env, plugin_main
from cni.types import LATEST, SUPPORTED_VERSIONS
from podnet import proc

FULL_ENV = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/pod", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin:/usr/lib/cni", "CNI_ARGS": "K8S_POD_NAME=web;IgnoreUnknown=1"}


def env_for(command, **overrides):
    env = dict(FULL_ENV, CNI_COMMAND=command)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def conf_bytes(version="1.0.0", name="podnet", **extra):
    conf = {"cniVersion": version, "name": name, "type": "fake"}
    if version is None:
        del conf["cniVersion"]
    conf.update(extra)
    return dumps(conf).encode()


def cni_error(exc_info):
    return exc_info.value.code, exc_info.value.msg


# --- args_from_env: environment --------------------------------------------------------

def test_add_args_parsed():
    args = args_from_env(env_for("ADD"), conf_bytes())
    assert args.command == "ADD" and args.container_id == "c1"
    assert args.netns == "/var/run/netns/pod" and args.ifname == "eth0"
    assert args.path == ["/opt/cni/bin", "/usr/lib/cni"]
    assert args.version == "1.0.0" and args.conf["name"] == "podnet"
    assert args.stdin == conf_bytes()
    assert args.cni_args() == {"K8S_POD_NAME": "web", "IgnoreUnknown": "1"}


@pytest.mark.parametrize("command,missing,expect", [
    ("ADD", ["CNI_NETNS", "CNI_IFNAME"], "[CNI_NETNS,CNI_IFNAME]"),
    ("ADD", ["CNI_CONTAINERID"], "[CNI_CONTAINERID]"),
    ("ADD", ["CNI_PATH"], "[CNI_PATH]"),
    ("ADD", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
     "[CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH]"),
    ("CHECK", ["CNI_NETNS"], "[CNI_NETNS]"),
    ("CHECK", ["CNI_IFNAME", "CNI_CONTAINERID"], "[CNI_CONTAINERID,CNI_IFNAME]"),
    ("DEL", ["CNI_CONTAINERID", "CNI_IFNAME"], "[CNI_CONTAINERID,CNI_IFNAME]"),
    ("DEL", ["CNI_PATH"], "[CNI_PATH]"),
    ("GC", ["CNI_PATH"], "[CNI_PATH]"),
    ("STATUS", ["CNI_PATH"], "[CNI_PATH]"),
])
def test_required_env_missing(command, missing, expect):
    version = "1.1.0"
    for how in (None, ""):       # unset and empty are the same
        env = env_for(command, **{k: how for k in missing})
        with pytest.raises(CNIError) as e:
            args_from_env(env, conf_bytes(version))
        assert cni_error(e) == (errors.INVALID_ENV, "required env variables %s missing" % expect)


@pytest.mark.parametrize("command,optional", [
    ("DEL", ["CNI_NETNS"]),                       # DEL may come after the netns is gone
    ("GC", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
    ("STATUS", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
    ("ADD", ["CNI_ARGS"]),
])
def test_optional_env(command, optional):
    args = args_from_env(env_for(command, **{k: None for k in optional}), conf_bytes("1.1.0"))
    assert args.command == command


def test_missing_and_unknown_command():
    with pytest.raises(CNIError) as e:
        args_from_env(env_for("ADD", CNI_COMMAND=None), conf_bytes())
    assert cni_error(e) == (errors.INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    with pytest.raises(CNIError) as e:
        args_from_env(env_for("add"), conf_bytes())
    assert cni_error(e) == (errors.INVALID_ENV, "unknown CNI_COMMAND: add")


def test_version_command_needs_nothing():
    args = args_from_env({"CNI_COMMAND": "VERSION"}, b"")
    assert args.command == "VERSION" and args.conf == {} and args.path == []


# --- args_from_env: versions --------------------------------------------------------

@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_and_del_accept_every_supported_version(version):
    for command in ("ADD", "DEL"):
        assert args_from_env(env_for(command), conf_bytes(version)).version == version


def test_missing_cni_version_means_010():
    # As libcni's ConfigDecoder: absent, empty or null is 0.1.0.
    assert args_from_env(env_for("ADD"), conf_bytes(None)).version == "0.1.0"
    assert args_from_env(env_for("ADD"), conf_bytes("")).version == "0.1.0"
    raw = b'{"cniVersion": null, "name": "podnet"}'
    assert args_from_env(env_for("ADD"), raw).version == "0.1.0"


@pytest.mark.parametrize("command,version,ok", [
    ("CHECK", "0.3.1", False), ("CHECK", "0.4.0", True), ("CHECK", "1.0.0", True),
    ("CHECK", None, False),
    ("GC", "1.0.0", False), ("GC", "1.1.0", True),
    ("STATUS", "0.4.0", False), ("STATUS", "1.1.0", True),
])
def test_commands_need_a_recent_enough_version(command, version, ok):
    if ok:
        assert args_from_env(env_for(command), conf_bytes(version)).command == command
        return
    with pytest.raises(CNIError) as e:
        args_from_env(env_for(command), conf_bytes(version))
    assert e.value.code == errors.INCOMPATIBLE_VERSION
    assert command in e.value.msg


@pytest.mark.parametrize("version", ["0.5.0", "2.0.0", "1.0", "latest", " 1.0.0"])
def test_unknown_version_lists_supported(version):
    with pytest.raises(CNIError) as e:
        args_from_env(env_for("ADD"), conf_bytes(version))
    assert e.value.code == errors.INCOMPATIBLE_VERSION
    for v in SUPPORTED_VERSIONS:
        assert v in e.value.msg


@pytest.mark.parametrize("stdin,code", [
    (b"", errors.DECODING_FAILURE),
    (b"{not json", errors.DECODING_FAILURE),
    (b'["a list"]', errors.DECODING_FAILURE),
    (b'{"cniVersion": 1.0, "name": "x"}', errors.DECODING_FAILURE),
    (b"\xff\xfe", errors.DECODING_FAILURE),
])
def test_bad_config(stdin, code):
    with pytest.raises(CNIError) as e:
        args_from_env(env_for("ADD"), stdin)
    assert e.value.code == code


@pytest.mark.parametrize("stdin", [
    b'{"cniVersion": "1.0.0", "name": "podnet", "type": "fake", "x": "\\ud800"}',
    b'{"cniVersion": "1.0.\\udfff", "name": "podnet", "type": "fake"}',
    b'{"cniVersion": "1.0.0", "name": "podnet", "type": "fake", "ipam": {"dataDir": "/a\\udc80"}}',
    b'{"cniVersion": "1.0.0", "name": "podnet", "type": "fake", "prevResult": {"dns": {"domain": "\\ud83d"}}}',
])
def test_unencodable_config_is_a_decoding_failure(stdin):
    """Regression: a lone surrogate passed parsing and crashed the output later."""
    with pytest.raises(CNIError) as e:
        args_from_env(env_for("ADD"), stdin)
    assert e.value.code == errors.DECODING_FAILURE and "lone surrogate" in e.value.msg
    str(e.value).encode("utf-8")


@pytest.mark.parametrize("value", [5, True, ["bridge"], {"t": 1}])
@pytest.mark.parametrize("command", ["ADD", "DEL", "GC"])
def test_type_must_be_a_string(value, command):
    """Regression: "type": 5 was accepted."""
    with pytest.raises(CNIError) as e:
        args_from_env(env_for(command), conf_bytes("1.1.0", type=value))
    assert e.value.code == errors.INVALID_NETCONF and "type" in e.value.msg


def test_type_null_or_missing_is_accepted():
    assert args_from_env(env_for("ADD"), conf_bytes(type=None)).conf["type"] is None
    raw = b'{"cniVersion": "1.0.0", "name": "podnet"}'
    assert "type" not in args_from_env(env_for("ADD"), raw).conf


@pytest.mark.parametrize("key", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"])
@pytest.mark.parametrize("bad", ["\udcff", "\x00"])
def test_environment_that_is_not_text(key, bad):
    """Regression: bytes that are not UTF-8 (os.environ holds them as lone surrogates)
    and NUL (possible through a mapping, never through exec) got through."""
    env = env_for("ADD", **{key: FULL_ENV[key].replace("/", bad, 1) if "/" in FULL_ENV[key]
                            else FULL_ENV[key] + bad})
    with pytest.raises(CNIError) as e:
        args_from_env(env, conf_bytes())
    assert e.value.code == errors.INVALID_ENV and key in e.value.msg
    str(e.value).encode("utf-8")


def test_conf_path():
    assert skel.conf_path({"p": "/run/x"}, "p", "/d") == "/run/x"
    assert skel.conf_path({}, "p", "/d") == "/d"
    assert skel.conf_path({"p": None}, "p", "/d") == "/d"
    for bad in ("/run/\x00x", "", 5):
        with pytest.raises(CNIError) as e:
            skel.conf_path({"p": bad}, "p", "/d")
        assert e.value.code == errors.INVALID_NETCONF and "p" in e.value.msg


def test_netns_path_with_nul_is_invalid_env():
    from cni.container import open_container_netns
    with pytest.raises(CNIError) as e:
        open_container_netns("/run/netns/a\x00b")
    assert e.value.code == errors.INVALID_ENV


# --- args_from_env: names ------------------------------------------------------------

@pytest.mark.parametrize("name,ok", [
    ("podnet", True), ("a", True), ("0net", True), ("my_net.v1-2", True),
    ("-net", False), ("_net", False), (".net", False), ("my net", False), ("a/b", False),
    ("naïve", False), ("net\n", False), ("a:b", False),
])
def test_network_name(name, ok):
    if ok:
        assert args_from_env(env_for("ADD"), conf_bytes(name=name)).conf["name"] == name
        return
    with pytest.raises(CNIError) as e:
        args_from_env(env_for("ADD"), conf_bytes(name=name))
    assert cni_error(e) == (errors.INVALID_NETCONF, "invalid characters found in network name")


@pytest.mark.parametrize("name", [None, "", 5, ["podnet"]])
def test_network_name_missing_or_not_a_string(name):
    raw = {"cniVersion": "1.0.0", "type": "fake"}
    if name is not None:
        raw["name"] = name
    with pytest.raises(CNIError) as e:
        args_from_env(env_for("ADD"), dumps(raw).encode())
    assert e.value.code == errors.INVALID_NETCONF


@pytest.mark.parametrize("cid,ok", [
    ("c1", True), ("0123abcdef", True), ("A_b.c-d", True), ("x" * 200, True),
    ("-c1", False), ("_c1", False), ("c 1", False), ("c/1", False), ("c;1", False),
    ("ć1", False), ("c1\n", False),
])
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_container_id(cid, ok, command):
    env = env_for(command, CNI_CONTAINERID=cid)
    if ok:
        assert args_from_env(env, conf_bytes()).container_id == cid
        return
    with pytest.raises(CNIError) as e:
        args_from_env(env, conf_bytes())
    assert cni_error(e) == (errors.INVALID_ENV, "invalid characters in containerID")
    assert e.value.details == cid


def test_container_id_empty_is_unknown_container():
    with pytest.raises(CNIError) as e:
        skel.validate_container_id("")
    assert cni_error(e) == (errors.UNKNOWN_CONTAINER, "missing containerID")


@pytest.mark.parametrize("ifname,msg", [
    ("eth0", None), ("x" * 15, None), ("net1.100", None), ("ėth0", None),
    ("x" * 16, "interface name is too long"),
    # IFNAMSIZ counts bytes: 8 characters, 16 bytes in UTF-8 (regression: was len())
    ("é" * 8, "interface name is too long"),
    (".", "interface name is . or .."), ("..", "interface name is . or .."),
    ("a/b", "interface name contains / or : or whitespace characters"),
    ("a:b", "interface name contains / or : or whitespace characters"),
    ("a b", "interface name contains / or : or whitespace characters"),
    ("a\tb", "interface name contains / or : or whitespace characters"),
    ("eth0\n", "interface name contains / or : or whitespace characters"),
])
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_ifname(ifname, msg, command):
    env = env_for(command, CNI_IFNAME=ifname)
    if msg is None:
        assert args_from_env(env, conf_bytes()).ifname == ifname
        return
    with pytest.raises(CNIError) as e:
        args_from_env(env, conf_bytes())
    assert cni_error(e) == (errors.INVALID_ENV, msg)


def test_ifname_empty():
    with pytest.raises(CNIError) as e:
        skel.validate_ifname("")
    assert cni_error(e) == (errors.INVALID_ENV, "interface name is empty")


@pytest.mark.parametrize("raw,expect", [
    ("", {}), ("A=1", {"A": "1"}), ("A=1;B=", {"A": "1", "B": ""}), ("A=b=c", {"A": "b=c"}),
])
def test_cni_args(raw, expect):
    assert args_from_env(env_for("ADD", CNI_ARGS=raw), conf_bytes()).cni_args() == expect


@pytest.mark.parametrize("raw", ["A", "=1", "A=1;;B=2", "A=1;junk"])
def test_cni_args_invalid(raw):
    args = args_from_env(env_for("ADD", CNI_ARGS=raw), conf_bytes())
    with pytest.raises(CNIError) as e:
        args.cni_args()
    assert e.value.code == errors.INVALID_ENV


# --- plugin_main -----------------------------------------------------------------

def _main(capsys, env, stdin, commands=None, about=""):
    with pytest.raises(SystemExit) as e:
        plugin_main(commands or {}, about=about, env=env, stdin=stdin)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("requested,answered", [
    (None, LATEST), ("0.4.0", "0.4.0"), ("1.0.0", "1.0.0"), ("0.1.0", "0.1.0"),
    ("1.1.0", "1.1.0"), ("9.9.9", LATEST),
])
def test_version_output(capsys, requested, answered):
    stdin = b"" if requested is None else dumps({"cniVersion": requested}).encode()
    code, out, _ = _main(capsys, {"CNI_COMMAND": "VERSION"}, stdin)
    assert code == 0
    assert out == '{"cniVersion":"%s","supportedVersions":[%s]}' % (
        answered, ",".join('"%s"' % v for v in SUPPORTED_VERSIONS))
    assert "1.1.0" in loads(out)["supportedVersions"]


def test_version_with_bad_json_is_an_error(capsys):
    code, out, _ = _main(capsys, {"CNI_COMMAND": "VERSION"}, b"{oops")
    assert code == 1 and loads(out)["code"] == errors.DECODING_FAILURE


def _add_ok(args):
    return {"interfaces": [{"name": "eth0", "sandbox": args.netns}],
            "ips": [{"interface": 0, "address": "10.1.0.5/24", "gateway": "10.1.0.1"}],
            "routes": [], "dns": {}}


@pytest.mark.parametrize("version", ["0.2.0", "0.4.0", "1.0.0"])
def test_plugin_main_add_prints_result_in_config_version(capsys, version):
    code, out, _ = _main(capsys, env_for("ADD"), conf_bytes(version), {"ADD": _add_ok})
    assert code == 0
    result = loads(out)
    assert result["cniVersion"] == version
    assert out == dumps(result, indent=4)          # pretty, as the reference plugins
    if version == "0.2.0":
        assert result["ip4"] == {"ip": "10.1.0.5/24", "gateway": "10.1.0.1"}
    elif version == "0.4.0":
        assert result["ips"][0]["version"] == "4"
    else:
        assert "version" not in result["ips"][0]


def test_plugin_main_del_prints_nothing(capsys):
    calls = []
    code, out, _ = _main(capsys, env_for("DEL"), conf_bytes(), {"DEL": calls.append})
    assert code == 0 and out == "" and calls[0].command == "DEL"


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_default_to_success(capsys, command):
    code, out, _ = _main(capsys, env_for(command), conf_bytes("1.1.0"), {"ADD": _add_ok})
    assert (code, out) == (0, "")


def test_plugin_main_unimplemented_command(capsys):
    code, out, _ = _main(capsys, env_for("CHECK"), conf_bytes(), {"ADD": _add_ok})
    assert code == 1 and loads(out)["code"] == errors.INVALID_ENV


def test_plugin_main_cni_error(capsys):
    def add(args):
        raise CNIError(errors.TRY_AGAIN_LATER, "busy", "come back later")
    code, out, _ = _main(capsys, env_for("ADD"), conf_bytes("0.4.0"), {"ADD": add})
    assert code == 1
    assert loads(out) == {"cniVersion": "0.4.0", "code": 11, "msg": "busy",
                          "details": "come back later"}
    assert out == dumps(loads(out), indent=4)


def test_plugin_main_env_error_uses_config_version(capsys):
    code, out, _ = _main(capsys, env_for("ADD", CNI_IFNAME=None), conf_bytes("0.4.0"),
                         {"ADD": _add_ok})
    assert code == 1
    assert loads(out) == {"cniVersion": "0.4.0", "code": errors.INVALID_ENV,
                          "msg": "required env variables [CNI_IFNAME] missing"}
    # No usable version in the config: the latest.
    for stdin in (b"{broken", conf_bytes("7.0.0"), b"[]"):
        code, out, _ = _main(capsys, env_for("ADD", CNI_IFNAME=None), stdin, {"ADD": _add_ok})
        assert code == 1 and loads(out)["cniVersion"] == LATEST


def test_plugin_main_unexpected_exception_is_999(capsys):
    def add(args):
        raise KeyError("boom")
    code, out, err = _main(capsys, env_for("ADD"), conf_bytes("1.0.0"), {"ADD": add})
    assert code == 1
    assert loads(out) == {"cniVersion": "1.0.0", "code": 999, "msg": "KeyError: 'boom'"}
    assert "Traceback" in err and "KeyError" in err


@pytest.mark.parametrize("raise_", [
    lambda: CNIError(errors.INVALID_NETCONF, "bad \udcff name", "details \ud800"),
    lambda: ValueError("text \udcff from somewhere"),
])
def test_error_output_cannot_crash(capsys, raise_):
    """Regression: an error quoting bad input crashed in the output step (no JSON at all)."""
    def add(args):
        raise raise_()
    code, out, err = _main(capsys, env_for("ADD"), conf_bytes("1.0.0"), {"ADD": add})
    assert code == 1
    import json
    err_json = json.loads(out)      # (fastjson.loads refuses the lone surrogate it quotes)
    assert out.isascii() and err_json["code"] in (errors.INVALID_NETCONF, errors.INTERNAL)
    assert "\udcff" in err_json["msg"]           # quoted faithfully, as a JSON escape
    assert "UnicodeEncodeError" not in err


def test_output_is_utf8_whatever_the_locale(capsys, monkeypatch):
    """stdout goes out as UTF-8 bytes even if the text layer has another encoding."""
    import io
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1"))

    def add(args):
        return {"interfaces": [{"name": "eth0", "sandbox": "/run/netns/\u4e2d"}], "ips": [],
                "routes": [], "dns": {}}
    with pytest.raises(SystemExit):
        plugin_main({"ADD": add}, env=env_for("ADD"), stdin=conf_bytes())
    sys.stdout.flush()
    assert loads(raw.getvalue())["interfaces"][0]["sandbox"] == "/run/netns/\u4e2d"


def test_plugin_main_prints_about_without_command(capsys):
    code, out, err = _main(capsys, {}, b"{}", about="podnet fake plugin v0")
    assert code == 1 and "podnet fake plugin v0" in err
    assert loads(out)["code"] == errors.INVALID_ENV


# --- cni.executable -----------------------------------------------------------------

def test_install_and_read_marker(tmp_path):
    paths = executable.install(str(tmp_path / "bin"), "/usr/bin/python3")
    assert sorted(os.path.basename(p) for p in paths) == sorted(executable.PLUGINS)
    for path in paths:
        name = os.path.basename(path)
        assert os.access(path, os.X_OK)
        assert executable.read_marker(path) == (executable.PLUGINS[name], executable.ROOT)
        with open(path) as f:
            assert f.readline() == "#!/usr/bin/python3 -IS\n"
    assert not [p for p in os.listdir(tmp_path / "bin") if p.endswith(".podnet-tmp")]
    # Installing again replaces in place.
    assert executable.install(str(tmp_path / "bin"), "/usr/bin/python3", ["loopback"]) == \
        [str(tmp_path / "bin" / "loopback")]


def test_read_marker_foreign_and_missing(tmp_path):
    script = tmp_path / "foreign"
    script.write_text("#!/bin/sh\necho hello\n")
    assert executable.read_marker(str(script)) is None
    no_shebang = tmp_path / "no-shebang"
    no_shebang.write_text(executable.MARKER + "cni.plugins.loopback /x\n")
    assert executable.read_marker(str(no_shebang)) is None
    assert executable.read_marker(str(tmp_path / "missing")) is None
    assert executable.read_marker(str(tmp_path)) is None                  # a directory
    assert executable.read_marker("/bin/sh") is None                      # an ELF binary
    other_tree = tmp_path / "other"
    other_tree.write_text("#!/usr/bin/python3 -IS\n%scni.plugins.bridge /elsewhere\n"
                          % executable.MARKER)
    assert executable.read_marker(str(other_tree)) == ("cni.plugins.bridge", "/elsewhere")


def test_installed_plugin_runs_as_a_process(tmp_path):
    """The installed script starts (-I -S, own sys.path) and answers VERSION compactly."""
    (path,) = executable.install(str(tmp_path), sys.executable, ["loopback"])
    done = proc.run([path], b'{"cniVersion":"0.4.0"}', env={"CNI_COMMAND": "VERSION"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == dumps({"cniVersion": "0.4.0",
                                          "supportedVersions": list(SUPPORTED_VERSIONS)})
    bad = proc.run([path], b"", env={"CNI_COMMAND": "ADD"})
    assert bad.returncode == 1
    assert loads(bad.stdout)["msg"].startswith("required env variables [")


# --- cni.invoke: find ----------------------------------------------------------------

def _write(path, text, mode=0o755):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(mode)
    return str(path)


def test_find(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _write(a / "not-exec", "#!/bin/sh\n", mode=0o644)
    _write(b / "not-exec", "#!/bin/sh\n")
    (a / "dir-plugin").mkdir()
    _write(b / "dir-plugin", "#!/bin/sh\n")
    _write(a / "both", "#!/bin/sh\n")
    _write(b / "both", "#!/bin/sh\n")
    assert invoke.find("not-exec", [str(a), str(b)]) == str(b / "not-exec")
    assert invoke.find("dir-plugin", [str(a), str(b)]) == str(b / "dir-plugin")
    assert invoke.find("both", [str(a), str(b)]) == str(a / "both")      # first wins
    with pytest.raises(CNIError) as e:
        invoke.find("host-local", [str(a), str(b)])
    assert cni_error(e) == (errors.PLUGIN_NOT_FOUND,
                            'failed to find plugin "host-local" in path [%s %s]' % (a, b))
    for bad in ("", "../bin/sh", "/bin/sh", None):
        with pytest.raises(CNIError) as e:
            invoke.find(bad, [str(a)])
        assert e.value.code == errors.INVALID_NETCONF


# --- cni.invoke: external plugins (shell-script test doubles) ---------------------------

RESULT_040 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pod"}],
    "ips": [{"version": "4", "interface": 0, "address": "10.1.2.3/24", "gateway": "10.1.2.1"},
            {"version": "6", "address": "fd00::3/64"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}],
    "dns": {"nameservers": ["10.1.2.1"]},
}


def _fake_plugin(directory, name, stdout, exit_code=0, stderr=""):
    """A shell script that records env and stdin next to itself, then answers."""
    return _write(directory / name, """
        #!/bin/sh
        env | grep '^CNI_' | sort > "$0.env"
        cat > "$0.stdin"
        printf '%%s' '%s'
        printf '%%s' '%s' >&2
        exit %d
    """ % (stdout, stderr, exit_code))


def _caller_args(path, stdin=b'{"cniVersion":"0.4.0","name":"podnet","type":"bridge"}',
                 version="0.4.0", command="ADD"):
    return CmdArgs(command, "ctr1", "/var/run/netns/pod", "eth0", "IgnoreUnknown=1", path,
                   stdin, loads(stdin), version)


def _recorded_env(plugin):
    with open(plugin + ".env") as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f)


def test_delegate_to_external_plugin(tmp_path, monkeypatch):
    plugin = _fake_plugin(tmp_path, "host-local", dumps(RESULT_040))
    args = _caller_args([str(tmp_path / "missing"), str(tmp_path)])
    result = invoke.delegate("host-local", "ADD", args)
    assert result == {
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pod"}],
        "ips": [{"interface": 0, "address": "10.1.2.3/24", "gateway": "10.1.2.1"},
                {"address": "fd00::3/64"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}],
        "dns": {"nameservers": ["10.1.2.1"]},
    }
    assert _recorded_env(plugin) == {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/var/run/netns/pod",
        "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1",
        "CNI_PATH": "%s:%s" % (tmp_path / "missing", tmp_path)}
    with open(plugin + ".stdin", "rb") as f:
        assert f.read() == args.stdin                   # IPAM gets the caller's config


def test_delegate_external_with_netconf(tmp_path):
    plugin = _fake_plugin(tmp_path, "meta", "")
    args = _caller_args([str(tmp_path)])
    assert invoke.delegate("meta", "DEL", args, netconf={"cniVersion": "1.0.0", "x": [1]}) is None
    with open(plugin + ".stdin", "rb") as f:
        assert loads(f.read()) == {"cniVersion": "1.0.0", "x": [1]}
    assert _recorded_env(plugin)["CNI_COMMAND"] == "DEL"
    invoke.delegate("meta", "CHECK", args, netconf=b"raw bytes")
    with open(plugin + ".stdin", "rb") as f:
        assert f.read() == b"raw bytes"


def test_delegate_external_020_result(tmp_path):
    raw = {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.2.3/24", "gateway": "10.1.2.1",
                                          "routes": [{"dst": "0.0.0.0/0"}]}, "dns": {}}
    _fake_plugin(tmp_path, "old", dumps(raw))
    result = invoke.delegate("old", "ADD", _caller_args([str(tmp_path)]))
    assert result["ips"] == [{"address": "10.1.2.3/24", "gateway": "10.1.2.1"}]
    assert result["routes"] == [{"dst": "0.0.0.0/0"}]


def test_delegate_external_error_json(tmp_path):
    _fake_plugin(tmp_path, "host-local",
                 dumps({"cniVersion": "0.4.0", "code": 11, "msg": "busy", "details": "later"},
                       indent=4), exit_code=1)
    with pytest.raises(CNIError) as e:
        invoke.delegate("host-local", "ADD", _caller_args([str(tmp_path)]))
    assert (e.value.code, e.value.msg, e.value.details) == (11, "busy", "later")


@pytest.mark.parametrize("answer", [
    {"code": "7", "msg": "x"}, {"code": True, "msg": "x"}, {"code": 7.5, "msg": "x"},
    {"code": 7, "msg": {"a": 1}}, {"code": 7, "msg": "x", "details": [1]},
])
def test_delegate_external_error_json_of_the_wrong_types(tmp_path, answer):
    """Regression (issue 12, defect 13): an error answer's fields were taken whatever their
    JSON type ("code": "7" became 7, a dict became our msg). Such an answer is a failed
    plugin, reported as one: 999 with its text."""
    _fake_plugin(tmp_path, "odd", dumps(dict(answer, cniVersion="1.0.0")), exit_code=1)
    with pytest.raises(CNIError) as e:
        invoke.delegate("odd", "ADD", _caller_args([str(tmp_path)]))
    assert e.value.code == errors.INTERNAL and isinstance(e.value.msg, str)
    assert isinstance(e.value.details, str) and e.value.msg.startswith("netplugin failed")


def test_delegate_external_crash_without_json(tmp_path):
    _fake_plugin(tmp_path, "crashy", "", exit_code=2, stderr="panic: runtime error")
    with pytest.raises(CNIError) as e:
        invoke.delegate("crashy", "ADD", _caller_args([str(tmp_path)]))
    assert e.value.code == errors.INTERNAL
    assert e.value.msg == "netplugin failed: panic: runtime error"
    assert e.value.details == "crashy"
    _fake_plugin(tmp_path, "silent", "", exit_code=3)
    with pytest.raises(CNIError) as e:
        invoke.delegate("silent", "DEL", _caller_args([str(tmp_path)]))
    assert e.value.msg == "netplugin failed: exit 3"


def test_delegate_external_undecodable_result(tmp_path):
    _fake_plugin(tmp_path, "garbage", "this is not json")
    with pytest.raises(CNIError) as e:
        invoke.delegate("garbage", "ADD", _caller_args([str(tmp_path)]))
    assert e.value.code == errors.DECODING_FAILURE
    _fake_plugin(tmp_path, "badshape", dumps({"cniVersion": "1.0.0", "ips": {"x": 1}}))
    with pytest.raises(CNIError) as e:
        invoke.delegate("badshape", "ADD", _caller_args([str(tmp_path)]))
    assert e.value.code == errors.DECODING_FAILURE


def test_delegate_not_found(tmp_path):
    with pytest.raises(CNIError) as e:
        invoke.delegate("nope", "ADD", _caller_args([str(tmp_path)]))
    assert e.value.code == errors.PLUGIN_NOT_FOUND


# --- cni.invoke: podnet's own executables run in-process ---------------------------------

FAKE_MODULE = '''
"""A podnet-style plugin module for the in-process delegation tests."""
import os
from cni import skel
from cni.errors import CNIError

CALLS = []


def cmd_add(args):
    CALLS.append((args.command, os.getpid()))
    fail = args.conf.get("fail")
    if fail == "cni":
        raise CNIError(11, "busy", "later")
    if fail == "crash":
        raise ValueError("boom")
    if fail == "self":          # its own IPAM: the same plugin with the same config
        from cni.invoke import delegate
        return delegate("fake-ipam", "ADD", args)
    ips = [{"interface": 0, "address": "10.1.2.3/24", "gateway": "10.1.2.1"}]
    if args.conf.get("two"):
        ips.append({"interface": 0, "address": "10.1.2.4/24"})
    return {"interfaces": [{"name": "eth0", "sandbox": args.netns, "mtu": 1400}],
            "ips": ips,
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1", "priority": 5}],
            "dns": {"nameservers": ["10.1.2.1"]}}


def cmd_del(args):
    CALLS.append((args.command, os.getpid()))


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_del}


def main():
    skel.plugin_main(COMMANDS)
'''


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """(bin dir with 'fake-ipam' installed as one of ours, same plugin as a foreign script, module)."""
    modname = "podnet_fake_plugin_%s" % uuid.uuid4().hex[:8]
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / (modname + ".py")).write_text(FAKE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    monkeypatch.setitem(executable.PLUGINS, "fake-ipam", modname)
    ours = tmp_path / "ours"
    executable.install(str(ours), sys.executable, ["fake-ipam"])
    # The same module behind a script without the marker: cni.invoke must exec it.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    _write(foreign / "fake-ipam", """
        #!%s -IS
        import sys; sys.path[:0] = [%r, %r]
        from %s import main; main()
    """ % (sys.executable, executable.ROOT, str(tmp_path / "mod"), modname))
    yield str(ours), str(foreign), modname
    sys.modules.pop(modname, None)


def _no_child_processes(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("delegate started a process: %r" % (a,))
    monkeypatch.setattr(proc, "run", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse)


@pytest.mark.parametrize("version", ["0.2.0", "0.4.0", "1.0.0", "1.1.0"])
def test_in_process_equals_executed(fake_plugin, monkeypatch, version):
    ours, foreign, modname = fake_plugin
    stdin = dumps({"cniVersion": version, "name": "podnet", "type": "fake-ipam"}).encode()
    executed = invoke.delegate("fake-ipam", "ADD", _caller_args([foreign], stdin, version))
    with monkeypatch.context() as m:
        _no_child_processes(m)
        in_process = invoke.delegate("fake-ipam", "ADD", _caller_args([ours], stdin, version))
    assert sys.modules[modname].CALLS == [("ADD", os.getpid())]
    assert in_process == executed
    # Shaped by the callee's version, as if printed and read back.
    if version == "1.1.0":
        assert in_process["interfaces"][0]["mtu"] == 1400
        assert in_process["routes"][0]["priority"] == 5
    else:
        assert "priority" not in in_process["routes"][0]


def test_in_process_del_and_errors(fake_plugin, monkeypatch):
    ours, foreign, modname = fake_plugin
    _no_child_processes(monkeypatch)
    args = _caller_args([ours], b'{"cniVersion":"1.0.0","name":"n","type":"fake-ipam"}', "1.0.0")
    assert invoke.delegate("fake-ipam", "DEL", args) is None
    assert sys.modules[modname].CALLS == [("DEL", os.getpid())]
    with pytest.raises(CNIError) as e:
        invoke.delegate("fake-ipam", "ADD", args, netconf={"cniVersion": "1.0.0", "name": "n",
                                                           "fail": "cni"})
    assert (e.value.code, e.value.msg, e.value.details) == (11, "busy", "later")
    # The callee validates its own environment as a process would.
    bad = CmdArgs("ADD", "bad id", "/x", "eth0", "", [ours], args.stdin, args.conf, "1.0.0")
    with pytest.raises(CNIError) as e:
        invoke.delegate("fake-ipam", "ADD", bad)
    assert e.value.code == errors.INVALID_ENV
    with pytest.raises(CNIError) as e:
        invoke.delegate("fake-ipam", "ADD", args, netconf=b"{broken")
    assert e.value.code == errors.DECODING_FAILURE


@pytest.mark.parametrize("netconf,code,msg", [
    ({"cniVersion": "1.0.0", "name": "n", "fail": "crash"}, errors.INTERNAL, "ValueError: boom"),
    ({"cniVersion": "0.2.0", "name": "n", "two": True}, errors.INCOMPATIBLE_VERSION, None),
])
def test_in_process_failures_match_executed(fake_plugin, monkeypatch, netconf, code, msg):
    """Regression: an unexpected exception in an in-process delegate escaped as itself;
    executed, the same plugin reports CNIError 999. Both paths now raise the same."""
    ours, foreign, _ = fake_plugin
    raised = []
    for path in (foreign, ours):
        with pytest.raises(CNIError) as e:
            invoke.delegate("fake-ipam", "ADD", _caller_args([path]), netconf=netconf)
        raised.append((e.value.code, e.value.msg))
    assert raised[0] == raised[1]
    assert raised[0][0] == code
    if msg:
        assert raised[0][1] == msg


def test_delegation_to_itself_is_an_invalid_config(fake_plugin):
    """Regression: bridge with "ipam": {"type": "bridge"} recursed in-process until
    Python's recursion limit and reported "exceeded max nesting depth"."""
    ours, _, modname = fake_plugin
    stdin = b'{"cniVersion": "1.0.0", "name": "n", "type": "fake-ipam", "fail": "self"}'
    with pytest.raises(CNIError) as e:
        invoke.delegate("fake-ipam", "ADD", _caller_args([ours], stdin, "1.0.0"))
    assert e.value.code == errors.INVALID_NETCONF
    assert "delegates to itself" in e.value.msg and "fake-ipam" in e.value.msg
    assert len(sys.modules[modname].CALLS) == 1     # the nested call was refused before it ran
    assert invoke.delegate("fake-ipam", "ADD", _caller_args([ours]))["ips"]     # state is clean


def test_marker_from_another_tree_is_executed(fake_plugin, tmp_path, monkeypatch):
    ours, _, modname = fake_plugin
    path = os.path.join(ours, "fake-ipam")
    mod_dir = os.path.join(os.path.dirname(ours), "mod")
    _write(tmp_path / "ours" / "fake-ipam", """
        #!%s -IS
        %s%s /some/other/podnet
        import sys; sys.path[:0] = [%r, %r]
        from %s import main; main()
    """ % (sys.executable, executable.MARKER, modname, executable.ROOT, mod_dir, modname))
    assert executable.read_marker(path) == (modname, "/some/other/podnet")
    ran = []
    real_run = proc.run
    monkeypatch.setattr(proc, "run", lambda *a, **kw: ran.append(a) or real_run(*a, **kw))
    result = invoke.delegate("fake-ipam", "ADD", _caller_args([ours]))
    assert ran and result["ips"][0]["address"] == "10.1.2.3/24"


# --- podnet.proc ------------------------------------------------------------------

def test_run_stdio_and_exit_code():
    done = proc.run(["sh", "-c", "cat; echo out-line; echo err-line >&2; exit 7"], b"from stdin\n")
    assert done.returncode == 7
    assert done.stdout == b"from stdin\nout-line\n"
    assert done.stderr == b"err-line\n"
    assert done.argv[0] == "sh" and "rc=7" in repr(done)
    assert proc.run(["true"]).returncode == 0
    assert proc.run(["false"]).returncode == 1
    assert proc.run(["cat"], "text input").stdout == b"text input"   # str is encoded


def test_run_killed_by_signal():
    done = proc.run(["sh", "-c", "kill -9 $$"])
    assert done.returncode == -9


def test_run_env():
    done = proc.run(["/usr/bin/env"], env={"ONLY": "this"})
    assert done.stdout == b"ONLY=this\n"
    os.environ["PODNET_PROC_TEST"] = "inherited"
    try:
        assert b"PODNET_PROC_TEST=inherited" in proc.run(["env"]).stdout
    finally:
        del os.environ["PODNET_PROC_TEST"]


def test_run_large_output_does_not_deadlock():
    size = 8 << 20
    done = proc.run(["sh", "-c", "head -c %d /dev/zero; head -c %d /dev/zero >&2" % (size, size)])
    assert done.returncode == 0
    assert len(done.stdout) == size and len(done.stderr) == size
    data = os.urandom(3 << 20)
    echoed = proc.run(["cat"], data)
    assert echoed.stdout == data


def test_run_missing_program(tmp_path):
    with pytest.raises(FileNotFoundError):
        proc.run(["podnet-no-such-program-%s" % uuid.uuid4().hex])
    with pytest.raises(FileNotFoundError):
        proc.run([str(tmp_path / "missing")])
    not_exec = tmp_path / "plain"
    not_exec.write_text("#!/bin/sh\n")
    with pytest.raises(FileNotFoundError):
        proc.run([str(not_exec)])


def test_run_leaks_no_file_descriptors():
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        proc.run(["true"], b"x")
    with pytest.raises(FileNotFoundError):
        proc.run(["podnet-no-such-program"])
    assert set(os.listdir("/proc/self/fd")) == before


def test_child_gets_the_memfds_only_as_stdio():
    # The memfds are close-on-exec: the child sees them as 0, 1 and 2 and nowhere else.
    # (Descriptors the test process itself inherited without CLOEXEC may show up too.)
    done = proc.run(["ls", "-l", "/proc/self/fd"])
    links = [line.split(" -> ") for line in done.stdout.decode().splitlines() if " -> " in line]
    memfds = sorted((left.split()[-1], right.split()[0]) for left, right in links
                    if right.startswith("/memfd:"))
    assert memfds == [("0", "/memfd:stdin"), ("1", "/memfd:stdout"), ("2", "/memfd:stderr")]


def test_which(tmp_path):
    assert proc.which("sh") in ("/bin/sh", "/usr/bin/sh")
    assert proc.which("/bin/sh") == "/bin/sh"
    assert proc.which("definitely-not-here-%s" % uuid.uuid4().hex) is None
    _write(tmp_path / "mytool", "#!/bin/sh\n")
    (tmp_path / "adir").mkdir()
    assert proc.which("mytool", path=str(tmp_path)) == str(tmp_path / "mytool")
    assert proc.which("adir", path=str(tmp_path)) is None
