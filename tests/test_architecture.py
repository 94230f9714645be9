"""The floors hold (import-linter, run as CI runs it), and the map in docs/architecture.md is true.

No root needed. The contract test also proves the contract bites: a copy of the
tree with one wrong-way import must fail `lint-imports`."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("cli", "lab", "cni", "ipam", "flanneld", "calico_lite", "kube_proxy", "ingress", "podnet")
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint_imports(tree):
    if not os.path.exists(LINT_IMPORTS):
        pytest.skip("import-linter is not installed (./dev setup installs it)")
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.run([LINT_IMPORTS, "--config", os.path.join(tree, "pyproject.toml"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def copy_tree(dest):
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(dest, pkg),
                        ignore=shutil.ignore_patterns("__pycache__", "*.j2", "templates"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), dest)


def test_the_floors_hold():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("where, forbidden, contract", [
    ("podnet/net/wrong_way.py", "import cni.skel", "ground floor"),              # ground -> library
    ("podnet/kube/wrong_way.py", "from kube_proxy import model", "Floors"),      # ground -> agent
    ("flanneld/wrong_way.py", "import calico_lite.agent", "Floors"),              # agent -> agent
    ("ingress/wrong_way.py", "from kube_proxy.model import ServicePort", "Floors"),
    ("kube_proxy/wrong_way.py", "def f():\n    from lab import cluster", "Floors"),  # even lazily
    ("cni/skel_helper.py", "import cni.plugins.bridge", "CNI spec library"),   # library -> plugin
    # appended to an existing module: the cycle proxier.py once hid behind a lazy import
    ("kube_proxy/proxier.py", "def _mode():\n    from kube_proxy import iptables", "No import cycles"),
])
def test_a_wrong_way_import_fails_the_contract(tmp_path, where, forbidden, contract):
    copy_tree(str(tmp_path))
    with open(os.path.join(tmp_path, where), "a") as f:       # new file, or appended to one
        f.write("\n" + forbidden + "\n")
    out = lint_imports(str(tmp_path))
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and contract in out.stdout


PATH_IN_TEXT = re.compile(r"`((?:cni|ipam|flanneld|calico_lite|kube_proxy|ingress|lab|cli|podnet|bench|docs|"
                          r"netns_tests|tests|deploy)/[\w/.-]*)`")


def test_every_file_the_architecture_map_names_exists():
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        text = f.read()
    named = set()
    for match in PATH_IN_TEXT.finditer(text):
        path = match.group(1).split(" ")[0].rstrip(".,:")
        named.add(path)
    assert len(named) > 30, "the map names too few files: %s" % sorted(named)
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, "docs/architecture.md names files that do not exist: %s" % missing


def test_test_modules_have_names_of_their_own():
    # tests/ and netns_tests/ have no __init__.py: pytest imports both as top-level modules,
    # and two files of one name stop the whole run at collection ("import file mismatch").
    names = {}
    for folder in ("tests", "netns_tests", "."):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py") and name != "conftest.py":
                names.setdefault(name, []).append(folder)
    assert {n: f for n, f in names.items() if len(f) > 1} == {}
