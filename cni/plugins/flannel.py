"""flannel: turn the node's flannel lease into a delegate config and run it.

flanneld writes /run/flannel/subnet.env (FLANNEL_NETWORK, FLANNEL_SUBNET,
FLANNEL_MTU, FLANNEL_IPMASQ, and the IPv6 pair). This plugin completes the
`delegate` section of its config the way the reference flannel CNI plugin
does (type bridge, host-local IPAM over the node's subnet with a route to the
whole cluster network, the lease's MTU, isGateway, ipMasq unless flanneld
already masquerades), saves the result under dataDir/<containerID> so that DEL
works even after subnet.env is gone, and runs the delegate from CNI_PATH.

Deliberate differences from the reference:
- a missing subnet.env on ADD is code 11 ("try again later": flanneld has not
  written it yet), a malformed one is code 7 naming the file and key;
- the saved delegate config is removed only after the delegate's DEL
  succeeded, so a failed DEL can be retried;
- a failed delegate ADD is followed at once by the delegate's DEL (the
  reference bridge leaves its veth behind when IPAM fails), and the saved
  config is dropped if that DEL succeeded, rejected the config (codes 1, 2, 6,
  7) or failed exactly as the ADD did (the same config failing the same way
  twice), kept for the runtime's DEL if it failed otherwise; a delegate type
  not in CNI_PATH fails the ADD before anything is saved;
- a saved config that cannot be used (unparseable, no type, or one the
  delegate's DEL rejects as invalid: codes 1, 2, 6, 7) is removed and the DEL
  succeeds: retrying it could never work, and a DEL that always fails makes a
  pod that can never be deleted. The reference also answers success for an
  unparseable file (but keeps it) and removes the file after any delegate DEL
  (returning that DEL's error once), so a transient failure is not retried;
- wrong types for subnetFile and dataDir (false, 0, [], {}) are code 7, not
  "unset"; so are paths holding NUL and config strings that are not Unicode
  text (lone surrogates);
- subnet.env is checked harder: FLANNEL_IPMASQ must be true or false (the
  reference reads anything else as false), a subnet must lie inside a
  network of its family, comments, blank lines and quotes are allowed;
- CHECK is implemented (delegate CHECK with the saved config and prevResult).
"""
from __future__ import annotations

import os
import sys

from cni import errors
from cni.errors import CNIError
from cni.fastjson import JSONError, dumps, loads, unencodable
from cni.invoke import delegate, find
from podnet.net.ip import parse_cidr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cni.skel import Commands

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
_ENAMETOOLONG = 36
# A delegate failing with one of these rejects the config itself: the same
# config can never succeed, so keeping it for a retry only blocks the DEL.
CONFIG_ERRORS = (errors.INCOMPATIBLE_VERSION, errors.UNSUPPORTED_FIELD, errors.DECODING_FAILURE,
                 errors.INVALID_NETCONF)


class SubnetEnv:
    """The parsed subnet.env: networks and subnets per family, MTU, ipmasq."""

    def __init__(self, networks, subnets, mtu, ipmasq):
        self.networks = networks      # cluster networks (IPNet), v4 then v6
        self.subnets = subnets        # this node's subnets (IPNet)
        self.mtu = mtu
        self.ipmasq = ipmasq


def load_subnet_env(path):
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise CNIError(errors.TRY_AGAIN_LATER,
                       "failed to load flannel subnet file %s: no such file; "
                       "is flanneld running on this node?" % path) from None
    except OSError as e:
        raise CNIError(errors.IO_FAILURE, "failed to read %s: %s" % (path, e.strerror)) from None
    return parse_subnet_env(text, path)


def parse_subnet_env(text, path="subnet.env"):
    values = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise CNIError(errors.INVALID_NETCONF, "%s line %d: expected KEY=VALUE, got %r" % (path, lineno, line))
        values[key.strip()] = value.strip().strip('"')

    def nets(key):
        out = []
        for item in filter(None, values.get(key, "").split(",")):
            try:
                net = parse_cidr(item.strip())
            except ValueError:
                raise CNIError(errors.INVALID_NETCONF, "%s: %s is not a CIDR: %r" % (path, key, item)) from None
            if not any(n.masked() == net.masked() for n in out):
                out.append(net)     # a repeated network would be a duplicate route
        return out

    networks = nets("FLANNEL_NETWORK") + nets("FLANNEL_IPV6_NETWORK")
    subnets = nets("FLANNEL_SUBNET") + nets("FLANNEL_IPV6_SUBNET")
    missing = [k for k, present in (("FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK", networks),
                                    ("FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET", subnets),
                                    ("FLANNEL_MTU", "FLANNEL_MTU" in values),
                                    ("FLANNEL_IPMASQ", "FLANNEL_IPMASQ" in values)) if not present]
    if missing:
        raise CNIError(errors.INVALID_NETCONF, "%s is missing %s" % (path, ", ".join(missing)))
    mtu = values["FLANNEL_MTU"]
    if not mtu.isdigit() or not 68 <= int(mtu) <= 65535:
        raise CNIError(errors.INVALID_NETCONF, "%s: FLANNEL_MTU is not a valid MTU: %r" % (path, mtu))
    ipmasq = values["FLANNEL_IPMASQ"].lower()
    if ipmasq not in ("true", "false"):
        raise CNIError(errors.INVALID_NETCONF, "%s: FLANNEL_IPMASQ must be true or false, not %r"
                       % (path, values["FLANNEL_IPMASQ"]))
    for sn in subnets:
        if not any(nw.family == sn.family and nw.prefixlen <= sn.prefixlen and nw.masked().contains(sn.ip)
                   for nw in networks):
            raise CNIError(errors.INVALID_NETCONF, "%s: subnet %s is outside the cluster network" % (path, sn))
    return SubnetEnv(networks, subnets, int(mtu), ipmasq == "true")


def delegate_config(conf, env):
    """The delegate's network config, completed from subnet.env as the reference does."""
    if not isinstance(conf.get("delegate") or {}, dict):
        raise CNIError(errors.INVALID_NETCONF, "delegate must be an object")
    deleg = dict(conf.get("delegate") or {})
    # As the reference: flannel sets these, a delegate that has them is a mistake.
    if "type" in deleg and not isinstance(deleg["type"], str):
        raise CNIError(errors.INVALID_NETCONF, "'delegate' dictionary, if present, must have (string) 'type' field")
    for key in ("name", "ipam"):
        if key in deleg:
            raise CNIError(errors.INVALID_NETCONF,
                           "'delegate' dictionary must not have '%s' field, it'll be set by flannel" % key)
    deleg["name"] = conf["name"]
    deleg.setdefault("type", "bridge")
    deleg.setdefault("ipMasq", not env.ipmasq)     # flanneld masquerades, or the bridge must
    deleg.setdefault("mtu", env.mtu)
    if deleg["type"] == "bridge":
        deleg.setdefault("isGateway", True)
    if conf.get("cniVersion"):
        deleg["cniVersion"] = conf["cniVersion"]
    if conf.get("runtimeConfig"):
        deleg["runtimeConfig"] = conf["runtimeConfig"]
    ipam = conf.get("ipam") or {}
    if not isinstance(ipam, dict):
        raise CNIError(errors.INVALID_NETCONF, "ipam must be an object")
    ipam = dict(ipam)
    ipam.setdefault("type", "host-local")
    ipam["ranges"] = [[{"subnet": str(sn.masked())}] for sn in env.subnets]
    routes = ipam.get("routes") or []
    if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
        raise CNIError(errors.INVALID_NETCONF, "ipam.routes must be a list of route objects")
    routes = list(routes)
    routes += [{"dst": str(nw.masked())} for nw in env.networks]
    ipam["routes"] = routes
    deleg["ipam"] = ipam
    return deleg


def _paths(conf):
    """(subnetFile, dataDir) after checking the whole config is printable text."""
    bad = _bad_text(conf)
    if bad:
        raise CNIError(errors.INVALID_NETCONF, bad)
    return _path(conf, "subnetFile", DEFAULT_SUBNET_FILE), _path(conf, "dataDir", DEFAULT_DATA_DIR)


def _path(conf, key, default):
    # null, missing and "" leave the reference's Go string at its default
    value = conf.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise CNIError(errors.INVALID_NETCONF, "%s must be a string, not %s" % (key, dumps(value)))
    if "\0" in value:
        raise CNIError(errors.INVALID_NETCONF, "%s holds a NUL character: %s" % (key, ascii(value)))
    return value


def _bad_text(obj, where="the network config"):
    """Why `obj` cannot be written back (a string, or key, holding a lone surrogate),
    or "" if it can."""
    bad = unencodable(obj, where)
    return "" if bad is None else "%s is not valid Unicode text (a lone surrogate): %s" % (bad[0], ascii(bad[1]))


NAME_MAX = 255        # bytes in one file name (ext4, xfs, tmpfs)


def _save(data_dir, container_id, data):
    if len(container_id.encode()) + len(".tmp") > NAME_MAX:
        # the saved config is dataDir/<container ID>: an ID no file can be named after
        raise CNIError(errors.INVALID_ENV, "CNI_CONTAINERID is %d bytes: too long to save the delegate "
                       "config under %s (at most %d)" % (len(container_id.encode()), data_dir,
                                                         NAME_MAX - len(".tmp")))
    path = os.path.join(data_dir, container_id)
    tmp = path + ".tmp"
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)   # a DEL never sees half a file
    except OSError as e:
        if e.errno == _ENAMETOOLONG:    # a dataDir no file system can hold: the config's fault
            raise CNIError(errors.INVALID_NETCONF, "dataDir %s: %s" % (ascii(data_dir), e.strerror)) from None
        raise CNIError(errors.IO_FAILURE, "failed to save the delegate config %s: %s"
                       % (ascii(path), e.strerror or e)) from None


def _drop(data_dir, container_id):
    try:
        os.unlink(os.path.join(data_dir, container_id))
    except FileNotFoundError:
        pass


def _load_saved(data_dir, container_id):
    """The saved delegate config as (bytes, dict, problem): (None, None, "") if there
    is none; (bytes, None, why) if it cannot be used."""
    path = os.path.join(data_dir, container_id)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None, ""
    except OSError as e:
        if e.errno == _ENAMETOOLONG:
            return None, None, ""     # no ADD could have saved it (see _save)
        raise CNIError(errors.IO_FAILURE, "failed to read saved delegate config %s: %s"
                       % (path, e.strerror or e)) from None
    try:
        conf = loads(data)
    except JSONError as e:
        return data, None, "failed to parse saved delegate config %s: %s" % (path, e)
    if not isinstance(conf, dict) or not isinstance(conf.get("type"), str):
        return data, None, "saved delegate config %s has no type" % path
    bad = _bad_text(conf, "saved delegate config %s" % path)
    if bad:
        return data, None, bad
    return data, conf, ""


def cmd_add(args):
    subnet_file, data_dir = _paths(args.conf)
    deleg = delegate_config(args.conf, load_subnet_env(subnet_file))
    data = dumps(deleg).encode()
    find(deleg["type"], args.path)      # a delegate that is not there: nothing to save
    _save(data_dir, args.container_id, data)
    try:
        return delegate(deleg["type"], "ADD", args, data)
    except CNIError as e:
        # A delegate may leave things behind when its ADD fails (the reference
        # bridge keeps the veth when IPAM fails): DEL it now. If that worked, or
        # the config is what fails (the delegate says so, or its DEL fails exactly
        # as its ADD did, as the reference plugins' 999s do), the saved config is
        # dropped: a retry could never do better. Otherwise the runtime's DEL
        # retries with it.
        try:
            delegate(deleg["type"], "DEL", args, data)
        except CNIError as d:
            keep = d.code not in CONFIG_ERRORS and (d.code, d.msg) != (e.code, e.msg)
        else:
            keep = False
        if not keep:
            _drop(data_dir, args.container_id)
        raise CNIError(e.code, "failed to delegate add: %s" % e.msg, e.details) from None


def cmd_del(args):
    _, data_dir = _paths(args.conf)
    data, deleg, problem = _load_saved(data_dir, args.container_id)
    if data is None:
        return None   # already cleaned up (or ADD never got that far)
    if deleg is not None:
        try:
            delegate(deleg["type"], "DEL", args, data)
        except CNIError as e:
            if e.code not in CONFIG_ERRORS:
                raise   # may work next time: keep the config for the retry
            problem = "the delegate rejects saved config %s: %s" % (os.path.join(data_dir, args.container_id), e)
    if problem:
        # Nothing this config can undo, now or later: forget it, as a DEL must
        # succeed when there is nothing left to do.
        sys.stderr.write("flannel: %s; removed it\n" % problem)
    _drop(data_dir, args.container_id)
    return None


def cmd_check(args):
    _, data_dir = _paths(args.conf)
    data, deleg, problem = _load_saved(data_dir, args.container_id)
    if data is None:
        raise CNIError(errors.INVALID_NETCONF, "no saved delegate config for container %s" % args.container_id)
    if deleg is None:
        raise CNIError(errors.DECODING_FAILURE, problem)
    if args.conf.get("prevResult"):
        deleg["prevResult"] = args.conf["prevResult"]
    delegate(deleg["type"], "CHECK", args, deleg)


def cmd_gc(args):
    """Drop saved delegate configs of attachments the runtime no longer knows,
    then let the delegate (and its IPAM) collect its own garbage."""
    subnet_file, data_dir = _paths(args.conf)
    valid = args.conf.get("cni.dev/valid-attachments") or []
    if not isinstance(valid, list):
        raise CNIError(errors.INVALID_NETCONF, "cni.dev/valid-attachments must be a list")
    keep = {a.get("containerID") for a in valid if isinstance(a, dict)}
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        names = []
    except OSError as e:
        if e.errno != _ENAMETOOLONG:    # a dataDir no file system can hold: nothing was saved
            raise CNIError(errors.IO_FAILURE, "failed to list %s: %s" % (ascii(data_dir), e.strerror)) from None
        names = []
    for name in names:
        if name not in keep and not name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(data_dir, name))
            except FileNotFoundError:
                pass
            except OSError as e:    # not ours to remove (a directory someone made): the rest still goes
                sys.stderr.write("flannel: GC left %s: %s\n" % (os.path.join(data_dir, name), e.strerror))
    try:
        deleg = delegate_config(args.conf, load_subnet_env(subnet_file))
    except CNIError as e:
        if e.code == errors.TRY_AGAIN_LATER:
            return None   # no lease yet: nothing the delegate can have allocated
        raise
    deleg["cni.dev/valid-attachments"] = valid
    delegate(deleg["type"], "GC", args, deleg)


def cmd_status(args):
    subnet_file, _ = _paths(args.conf)
    try:
        env = load_subnet_env(subnet_file)
    except CNIError as e:
        raise CNIError(errors.LIMITED_CONNECTIVITY, "flannel is not ready: %s" % e.msg) from None
    deleg = delegate_config(args.conf, env)
    delegate(deleg["type"], "STATUS", args, deleg)


COMMANDS: Commands = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def main() -> None:
    from cni.skel import run_plugin
    run_plugin(COMMANDS, about="podnet flannel plugin")
