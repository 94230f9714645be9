"""`podnet install-cni` (cli/install.py): the conflist step an init container runs, the
executables, and the plugin code copied out of the image. No root needed: everything goes
into temporary directories."""
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from cli import install
from cli.main import main
from cni.executable import PLUGINS, ROOT, read_marker

CONFLIST = {"name": "cbr0", "cniVersion": "0.3.1", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def run_install(capsys, *args):
    rc = main(["install-cni"] + [str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_conflist_installed_then_unchanged_and_others_left_alone(tmp_path, capsys):
    src = write(tmp_path / "cni-conf.json", CONFLIST)
    netd = tmp_path / "net.d"
    netd.mkdir()
    (netd / "99-other.conflist").write_text('{"name": "other", "plugins": [{"type": "bridge"}]}')
    (netd / "README").write_text("not a config")
    dest = netd / "10-flannel.conflist"
    rc, out, err = run_install(capsys, "--dest", tmp_path / "bin", "--conflist-src", src, "--conflist-dest", dest)
    assert rc == 0, err
    assert "wrote %s" % dest in out
    assert dest.read_bytes() == open(src, "rb").read()
    assert oct(dest.stat().st_mode & 0o777) == "0o644"
    mtimes = {p: p.stat().st_mtime_ns for p in [dest] + list((tmp_path / "bin").iterdir())}
    assert sorted(os.listdir(netd)) == ["10-flannel.conflist", "99-other.conflist", "README"]

    rc, out, err = run_install(capsys, "--dest", tmp_path / "bin", "--conflist-src", src, "--conflist-dest", dest)
    assert rc == 0, err
    assert "unchanged %s" % dest in out and "wrote" not in out
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "a rerun rewrote something"
    assert sorted(os.listdir(netd)) == ["10-flannel.conflist", "99-other.conflist", "README"]

    rc, out, err = run_install(capsys, "--dest", tmp_path / "bin", "--conflist-src", src, "--conflist-dest", dest,
                               "--remove-others")
    assert rc == 0, err
    assert "removed %s" % (netd / "99-other.conflist") in out
    assert sorted(os.listdir(netd)) == ["10-flannel.conflist", "README"]     # only what libcni would load
    assert dest.stat().st_mtime_ns == mtimes[dest]


def test_conflist_is_replaced_by_rename_never_written_in_place(tmp_path, monkeypatch):
    dest = str(tmp_path / "10-flannel.conflist")
    old = json.dumps(dict(CONFLIST, name="old")).encode()
    with open(dest, "wb") as f:
        f.write(old)
    new = json.dumps(dict(CONFLIST, name="new", padding="x" * 100000)).encode()
    src = tmp_path / "src.json"
    src.write_bytes(new)
    seen = []
    real_rename = os.rename

    def rename(a, b):
        # at the rename, the temporary file is complete, beside the target, in a name libcni
        # does not load, and the target still holds the old content
        seen.append((os.path.dirname(a), open(a, "rb").read() == new, open(b, "rb").read() == old,
                     a.endswith(install.CONF_EXTENSIONS)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    written, removed, conf = install.install_conflist(str(src), dest)
    assert written and removed == [] and conf["name"] == "new"
    assert seen == [(str(tmp_path), True, True, False)]
    assert open(dest, "rb").read() == new
    assert os.listdir(tmp_path) == ["10-flannel.conflist", "src.json"] or \
        sorted(os.listdir(tmp_path)) == ["10-flannel.conflist", "src.json"]


def test_concurrent_reader_sees_whole_configs_only(tmp_path):
    dest = str(tmp_path / "net.d" / "10-flannel.conflist")
    versions = [json.dumps(dict(CONFLIST, name="v%d" % i, padding=str(i) * 200000)).encode() for i in range(2)]
    srcs = []
    for i, data in enumerate(versions):
        path = tmp_path / ("v%d.json" % i)
        path.write_bytes(data)
        srcs.append(str(path))
    install.install_conflist(srcs[0], dest)
    stop, bad, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            with open(dest, "rb") as f:
                data = f.read()
            reads[0] += 1
            if data not in versions:
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            install.install_conflist(srcs[(i + 1) % 2], dest)
    finally:
        stop.set()
        t.join()
    assert reads[0] > 0 and bad == []
    assert sorted(os.listdir(os.path.dirname(dest))) == ["10-flannel.conflist"]      # no temporary left


@pytest.mark.parametrize("text, why", [
    ("{not json", "not JSON"),
    ('{"plugins": [{"type": "bridge"}]}', "needs a \"name\""),
    ('{"name": "x", "plugins": []}', "non-empty list"),
    ('{"name": "x"}', "neither a conflist"),
])
def test_a_config_a_runtime_would_refuse_is_not_installed(tmp_path, capsys, text, why):
    src = tmp_path / "bad.json"
    src.write_text(text)
    dest = tmp_path / "net.d" / "10-x.conflist"
    rc, out, err = run_install(capsys, "--dest", tmp_path / "bin", "--conflist-src", src, "--conflist-dest", dest)
    assert rc == 1 and why in err
    assert not dest.exists()


def test_conflist_flags_go_together_and_dest_needs_a_loaded_extension(tmp_path, capsys):
    src = write(tmp_path / "c.json", CONFLIST)
    assert run_install(capsys, "--dest", tmp_path / "bin", "--conflist-src", src)[0] == 2
    rc, _, err = run_install(capsys, "--dest", tmp_path / "bin", "--conflist-src", src,
                             "--conflist-dest", tmp_path / "net.d" / "10-x.txt")
    assert rc == 1 and "loads only" in err


def test_plugin_modules_cover_what_every_plugin_imports():
    """Every first-party module a plugin loads when run (its VERSION and the lazy imports the
    ADD/DEL paths make, read from the source) is in the copied set, and nothing else is."""
    modules = set(install.plugin_modules())
    assert {"cni.skel", "ipam.store", "podnet.net.netlink", "podnet.net.iptables", "podnet.proc"} <= modules
    assert not {m for m in modules if m.split(".")[0] not in install.PLUGIN_PACKAGES}
    assert "podnet.kube" not in modules and "podnet.etcd" not in modules
    for name, module in PLUGINS.items():
        proc = subprocess.run(["/usr/bin/python3", "-IS", "-X", "importtime", "-c",
                               "import sys; sys.path.insert(0, %r); from %s import main; main()" % (ROOT, module)],
                              input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30)
        loaded = {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines() if "|" in line}
        first_party = {m for m in loaded if m.split(".")[0] in ("cni", "ipam", "podnet", "flanneld", "kube_proxy",
                                                                "calico_lite", "network_policy", "ingress")}
        assert first_party and first_party <= modules, (name, first_party - modules)


def copy_tree(dest):
    """What an image holds: the packages the install command and the plugins need."""
    for package in ("cli", "cni", "ipam", "podnet"):
        shutil.copytree(os.path.join(ROOT, package), os.path.join(dest, package),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return str(dest)


def image_install(src, *args):
    """`podnet install-cni` run from the tree at src (as the init container runs it from the image)."""
    code = "import sys; sys.path.insert(0, %r); from cli.main import main; sys.exit(main(%r))" % (
        src, ["install-cni"] + [str(a) for a in args])
    return subprocess.run(["/usr/bin/python3", "-IS", "-c", code], capture_output=True, text=True, timeout=60)


def version_of(path):
    proc = subprocess.run([path], input=b'{"cniVersion": "1.0.0"}', env={"CNI_COMMAND": "VERSION"},
                          capture_output=True, timeout=30, cwd="/")
    assert proc.returncode == 0, (path, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def test_installed_executables_run_from_the_copied_code_with_the_source_gone(tmp_path):
    src = copy_tree(tmp_path / "image")
    bin_dir = tmp_path / "host" / "opt" / "cni" / "bin"
    proc = image_install(src, "--dest", bin_dir, "--copy-code")
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(src)                  # the image's tree is not on the host
    code_dirs = [d for d in os.listdir(bin_dir / install.CODE_DIR) if (bin_dir / install.CODE_DIR / d).is_dir()]
    assert len(code_dirs) == 1 and code_dirs[0].startswith(install.version() + "-")
    code = str(bin_dir / install.CODE_DIR / code_dirs[0])
    copied = sorted(os.path.relpath(os.path.join(d, f), code) for d, _, fs in os.walk(code) for f in fs
                    if f.endswith(".py"))
    assert copied == install.code_files()
    for name in PLUGINS:
        path = str(bin_dir / name)
        assert read_marker(path) == (PLUGINS[name], code)
        assert "1.0.0" in version_of(path)["supportedVersions"]
    record = json.loads((bin_dir / install.CODE_DIR / install.RECORD).read_text())
    assert record["code"] == code and record["executables"] == sorted(str(bin_dir / n) for n in PLUGINS)


def test_upgrade_writes_new_code_beside_keeps_previous_removes_older(tmp_path):
    src = copy_tree(tmp_path / "image")
    bin_dir = tmp_path / "bin"
    code_root = bin_dir / install.CODE_DIR

    def dirs():
        return sorted(d for d in os.listdir(code_root) if (code_root / d).is_dir())

    assert image_install(src, "--dest", bin_dir, "--copy-code").returncode == 0
    first = dirs()
    mtime = (bin_dir / "bridge").stat().st_mtime_ns
    proc = image_install(src, "--dest", bin_dir, "--copy-code")
    assert proc.returncode == 0 and "wrote" not in proc.stdout, proc.stdout
    assert dirs() == first and (bin_dir / "bridge").stat().st_mtime_ns == mtime
    for step in (1, 2):             # two upgrades: new code each time
        with open(os.path.join(src, "cni", "errors.py"), "a") as f:
            f.write("# upgrade %d\n" % step)
        proc = image_install(src, "--dest", bin_dir, "--copy-code")
        assert proc.returncode == 0, proc.stderr
    now = dirs()
    assert len(now) == install.KEEP_VERSIONS and first[0] not in now and "removed" in proc.stdout
    current = read_marker(str(bin_dir / "bridge"))[1]
    assert os.path.basename(current) in now
    assert "1.0.0" in version_of(str(bin_dir / "host-local"))["supportedVersions"]


def test_without_copy_code_the_executables_name_this_tree(tmp_path, capsys):
    rc, out, err = run_install(capsys, "--dest", tmp_path, "bridge")
    assert rc == 0 and read_marker(str(tmp_path / "bridge")) == (PLUGINS["bridge"], ROOT)
    assert not (tmp_path / install.CODE_DIR / "0").exists()
    assert run_install(capsys, "--dest", tmp_path, "nonesuch")[0] == 2


def test_a_plugin_importing_an_agent_is_refused(tmp_path):
    src = copy_tree(tmp_path / "tree")
    os.makedirs(os.path.join(src, "flanneld"))
    open(os.path.join(src, "flanneld", "__init__.py"), "w").close()
    with open(os.path.join(src, "cni", "plugins", "loopback.py"), "a") as f:
        f.write("\n\ndef _sneaky():\n    import flanneld  # noqa\n")
    with pytest.raises(install.InstallError, match="loopback imports flanneld"):
        install.plugin_modules(src)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
