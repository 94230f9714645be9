"""The Python distributions podnet's image takes from the venv, staged for `COPY` (deploy/image.sh).

Debian provides the interpreter and every dependency whose Debian package is recent enough
(DEBIAN below); the rest are the exact distributions the venv was tested with, copied from
its site-packages with their dist-info (etcd3gw reads its own version from it through pbr),
without bytecode (the image compiles it for its own interpreter) and without what no podnet
code path imports (SKIPPED). Each copied file keeps its mtime, so an unchanged venv stages an
unchanged tree and the image build's layer cache holds.

    python deploy/image_deps.py --site-packages .venv/lib/python3.11/site-packages --dest DIR
prints one `name==version` per staged distribution (a requirements file), then the bytes staged.
"""
import argparse
import os
import re
import shutil
import sys
from importlib import metadata

from packaging.requirements import Requirement

# The distributions podnet's own pyproject.toml names are the roots of the walk.
ROOT_DISTRIBUTION = "podnet"

# Installed from Debian bookworm in the base root file system (deploy/image.sh, PACKAGES).
DEBIAN = {"pyyaml": "python3-yaml", "jinja2": "python3-jinja2", "markupsafe": "python3-markupsafe"}

# Required on paper, never imported by podnet: the kubernetes client's asyncio flavour
# (kubernetes.aio, dropped below) is the only user of aiohttp; pbr needs setuptools only
# to build packages, not to read an installed distribution's version.
SKIPPED = {"aiohttp", "aiohttp-retry", "setuptools"}

# Paths inside a distribution's files that are left out (relative to site-packages).
EXCLUDED = re.compile(r"(^|/)__pycache__/|\.pyc$|^kubernetes/aio/|^\.\./")


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(site_packages, root=ROOT_DISTRIBUTION):
    """{normalized name: Distribution} reachable from `root`'s run-time requirements, without
    Debian's and the skipped ones (nor what only they require)."""
    found = {normalize(d.metadata["Name"]): d for d in metadata.distributions(path=[site_packages])}
    if normalize(root) not in found:
        raise SystemExit("image_deps: %s is not installed in %s" % (root, site_packages))
    wanted, queue = {}, [normalize(root)]
    while queue:
        dist = found[queue.pop()]
        for text in dist.requires or []:
            req = Requirement(text)
            name = normalize(req.name)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue    # an extra's requirement, or another platform's
            if name in wanted or name in DEBIAN or name in SKIPPED:
                continue
            if name not in found:
                raise SystemExit("image_deps: %s needs %s, which is not installed in %s"
                                 % (dist.metadata["Name"], req, site_packages))
            wanted[name] = found[name]
            queue.append(name)
    return wanted


def kept_files(dist):
    """The distribution's files (as its RECORD lists them, relative to site-packages) the image takes."""
    return [str(f) for f in dist.files or [] if not EXCLUDED.search(str(f))]


def stage(dist, dest):
    """Copy the distribution's kept files into dest (those already there unchanged are left
    alone); the bytes staged."""
    size = 0
    for rel in kept_files(dist):
        src = dist.locate_file(rel)
        if not os.path.isfile(src):
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not _same(src, target):
            shutil.copy2(src, target)
        size += os.path.getsize(target)
    return size


def _same(src, target):
    try:
        a, b = os.stat(src), os.stat(target)
    except FileNotFoundError:
        return False
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def _prune(dest, keep):
    """Remove files under dest that no staged distribution wrote (a dependency dropped since)."""
    for top, dirs, files in os.walk(dest, topdown=False):
        for name in files:
            path = os.path.join(top, name)
            if os.path.relpath(path, dest) not in keep:
                os.unlink(path)
        for name in dirs:
            path = os.path.join(top, name)
            if not os.listdir(path):
                os.rmdir(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site-packages", required=True, help="the venv's site-packages")
    p.add_argument("--dest", required=True, help="the staging directory (made, pruned of stale files)")
    opts = p.parse_args(argv)
    os.makedirs(opts.dest, exist_ok=True)
    keep, total = set(), 0
    for _, dist in sorted(closure(opts.site_packages).items()):
        total += stage(dist, opts.dest)
        keep.update(kept_files(dist))
        print("%s==%s" % (dist.metadata["Name"], dist.version))
    _prune(opts.dest, keep)
    print("# %d bytes staged" % total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
