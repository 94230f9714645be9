#!/usr/bin/env bash
# Builds podnet's node image, localhost/podnet:<version>, on this machine with no registry
# (`./dev image` runs it after installing mmdebstrap, buildah and podman):
#   1. mmdebstrap makes a Debian bookworm root file system from the mirror apt uses here,
#      cached as build/image/rootfs-<key>.tar, the key a hash of everything that goes into it;
#   2. a build context is staged in build/image/context: that tarball, the venv's distributions
#      Debian lacks (deploy/image_deps.py), podnet's source packages, the entry points;
#   3. podman builds deploy/Containerfile on it, unless the image already carries the
#      context's digest (a rerun with nothing changed takes under a second);
#   4. the new image is checked (every daemon's modules and dependencies import) and its size printed.
# Podman's storage stays where podman keeps it (/var/lib/containers); nothing else is touched.
#   deploy/image.sh --check  exit 0 if the image is built from the tree as it is, 1 if not (builds nothing)
#   PODNET_IMAGE_REFRESH=1   make the root file system again (Debian's updates since the last one)
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
IMAGE=localhost/podnet:$VERSION
SUITE=bookworm
# What the daemons run (iptables-restore/-save, nft, ipset, conntrack) and an operator's ip(8).
PACKAGES=(python3 python3-yaml python3-jinja2 iptables nftables ipset conntrack iproute2)
# Left out of every package: nothing in the image reads them (the copyright files stay; the
# stdlib's test and pydoc_data stay too: python3.11's postinst compiles them).
EXCLUDE=('/usr/share/man/*' '/usr/share/doc/*' '/usr/share/info/*' '/usr/share/locale/*'
         '/usr/share/lintian/*' '/usr/share/bash-completion/*' '/usr/lib/x86_64-linux-gnu/gconv/*')
INCLUDE=('/usr/share/doc/*/copyright')
CLEAN='rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/var/cache/ldconfig/aux-cache "$1"/var/lib/dpkg/*-old'
SOURCE_PACKAGES=(podnet cni ipam flanneld calico_lite kube_proxy ingress network_policy diagnose cli)
SITE_PACKAGES=.venv/lib/python3.11/site-packages
CACHE=build/image
CONTEXT=$CACHE/context

die() { echo "podnet image: $*" >&2; exit 1; }

# The containers' limits, explicit and no higher than ours: podman's default raises RLIMIT_NOFILE
# to 1048576, which needs CAP_SYS_RESOURCE (root lacks it on some machines, this one included).
RUN_LIMITS=(--ulimit nproc=4096:4096)
[ "$(ulimit -Hn)" = unlimited ] || RUN_LIMITS+=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)")

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap and podman build as root)"
for tool in mmdebstrap podman; do
    command -v "$tool" > /dev/null || die "$tool is missing: run ./dev image (it installs mmdebstrap, buildah, podman)"
done
[ -x .venv/bin/python ] || die "no venv: run ./dev image (it sets one up)"

# The Debian mirror apt already uses here, else Debian's own.
sources() {
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then echo /etc/apt/sources.list.d/debian.sources
    elif [ -s /etc/apt/sources.list ]; then echo /etc/apt/sources.list
    else echo "http://deb.debian.org/debian"; fi
}

# The root file system's cache key: everything that goes into it.
rootfs_key() {
    local src
    src=$(sources)
    { mmdebstrap --version; echo "$SUITE"; printf '%s\n' "${PACKAGES[@]}" "${EXCLUDE[@]}" "${INCLUDE[@]}" "$CLEAN"
      if [ -f "$src" ]; then cat "$src"; else echo "$src"; fi; } | sha256sum | cut -c1-16
}

# Prints the path of the cached root file system tarball, making it when missing.
rootfs() {
    local src key=$1 tar partial opts=()
    src=$(sources)
    tar=$CACHE/rootfs-$key.tar
    if [ -s "$tar" ] && [ -z "${PODNET_IMAGE_REFRESH:-}" ]; then echo "$tar"; return; fi
    for p in "${EXCLUDE[@]}"; do opts+=("--dpkgopt=path-exclude=$p"); done
    for p in "${INCLUDE[@]}"; do opts+=("--dpkgopt=path-include=$p"); done
    partial=$CACHE/rootfs-$key.partial.tar
    echo "podnet image: mmdebstrap $SUITE (${PACKAGES[*]}) from $src" >&2
    if ! mmdebstrap --variant=essential --format=tar --include="$(IFS=,; echo "${PACKAGES[*]}")" \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr "${opts[@]}" --customize-hook="$CLEAN" \
            "$SUITE" "$partial" "$src" > "$CACHE/mmdebstrap.log" 2>&1; then
        tail -n 30 "$CACHE/mmdebstrap.log" >&2
        rm -f "$partial"
        die "mmdebstrap failed (the whole log: $CACHE/mmdebstrap.log)"
    fi
    mv "$partial" "$tar"
    find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar' ! -path "$tar" -delete     # superseded ones
    echo "$tar"
}

# Writes stdin to $1 only if it differs: an unchanged file keeps its mtime (and the layer cache).
write_if_changed() {
    local tmp="$1.tmp"
    cat > "$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else chmod "${2:-644}" "$tmp"; mv "$tmp" "$1"; fi
}

# The context but the root file system (the cheap part: --check stages it too).
stage_context() {
    local pkg
    mkdir -p "$CONTEXT/bin"
    .venv/bin/python deploy/image_deps.py --site-packages "$SITE_PACKAGES" --dest "$CONTEXT/site-packages" \
        > "$CACHE/requirements.txt"
    # the source tree as it is (tracked or not), code and templates only, mtimes kept
    rm -rf "$CONTEXT/podnet"
    mkdir -p "$CONTEXT/podnet"
    for pkg in "${SOURCE_PACKAGES[@]}"; do
        find "$pkg" -name __pycache__ -prune -o -type f \( -name '*.py' -o -name '*.j2' \) -print
    done | tar -c --no-recursion -T - | tar -x -C "$CONTEXT/podnet"
    echo /opt/podnet | write_if_changed "$CONTEXT/podnet.pth"
    printf '#!/usr/bin/python3\nimport sys\nfrom cli.main import main\nsys.exit(main())\n' \
        | write_if_changed "$CONTEXT/bin/podnet" 755
    printf '#!/usr/bin/python3\nimport sys\nfrom flanneld.daemon import main\nsys.exit(main())\n' \
        | write_if_changed "$CONTEXT/bin/flanneld" 755
}

# What the build reads: the root file system by its key, the venv's files by name, size and
# mtime (copies keep their mtimes), podnet's code and entry points by content (a checkout that
# only changes mtimes rebuilds nothing), and the Containerfile.
context_digest() {
    { echo "rootfs $1"
      (cd "$CONTEXT" && find site-packages -type f -printf '%p %s %T@\n' | LC_ALL=C sort \
          && find podnet bin podnet.pth -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
      cat deploy/Containerfile; } | sha256sum | cut -c1-16
}

image_digest() {
    podman image inspect --format '{{index .Labels "org.podnet.inputs"}}' "$IMAGE" 2>/dev/null || true
}

size_report() {
    local bytes
    bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
    echo "podnet image: $IMAGE $(podman image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-12)," \
         "$bytes bytes ($((bytes / 1000000)) MB)"
}

smoke_check() {
    podman run --rm --pull=never "${RUN_LIMITS[@]}" --network none --entrypoint /usr/bin/python3 "$IMAGE" -c '
import kubernetes.client, kubernetes.config, kubernetes.client.rest, etcd3gw.client, prometheus_client, yaml, jinja2
import flanneld.daemon, kube_proxy.server, calico_lite.agent, cli.main, cni.executable
try:
    import network_policy.server
except ModuleNotFoundError as e:
    if e.name != "network_policy.server":
        raise
' && podman run --rm --pull=never "${RUN_LIMITS[@]}" --network none "$IMAGE" --help > /dev/null
}

main() {
    local started key digest old
    started=$EPOCHREALTIME
    mkdir -p "$CACHE"
    key=$(rootfs_key)
    stage_context
    digest=$(context_digest "$key")
    if [ "${1:-}" = --check ]; then     # exit 0 if the image is built from this tree as it is now
        [ "$(image_digest)" = "$digest" ] && echo "podnet image: $IMAGE is up to date" && return 0
        echo "podnet image: $IMAGE is missing or older than the tree (./dev image builds it)"; return 1
    fi
    if [ "$(image_digest)" = "$digest" ]; then
        echo "podnet image: $IMAGE is up to date (inputs $digest)"
    else
        ln -f "$(rootfs "$key")" "$CONTEXT/rootfs.tar"
        old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
        podman build --quiet --network none --pull=never --layers --build-arg "VERSION=$VERSION" \
            --label "org.podnet.inputs=$digest" -f deploy/Containerfile -t "$IMAGE" "$CONTEXT" > /dev/null
        if ! smoke_check; then
            podman rmi -f "$IMAGE" > /dev/null 2>&1 || true
            die "the new image fails its import check; removed"
        fi
        # the image this one replaced, if nothing else names or uses it
        if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
            podman rmi "$old" > /dev/null 2>&1 || true
        fi
    fi
    size_report
    echo "podnet image: done in $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $started }") s"
}

main "$@"
