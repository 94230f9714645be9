"""A small CRI client for tests: the calls kubelet makes to its container runtime, over gRPC.

The messages below are the part of the CRI's runtime.v1 API that a pod sandbox's life
needs, restated with the published package, service and message names and field numbers
(Kubernetes' cri-api, pkg/apis/runtime/v1/api.proto; containerd 1.6.20 serves the v0.25.0
revision of it). Field numbers and types are all the wire format is made of, and protobuf
skips fields a side does not know, so a subset talks to the full service; a field is added
here the day a test needs it. grpcio-tools compiles the text once per process into a
temporary directory (a tenth of a second); nothing generated is committed.
"""
import atexit
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading

PROTO = """
syntax = "proto3";
package runtime.v1;

service RuntimeService {
    rpc Version(VersionRequest) returns (VersionResponse) {}
    rpc RunPodSandbox(RunPodSandboxRequest) returns (RunPodSandboxResponse) {}
    rpc StopPodSandbox(StopPodSandboxRequest) returns (StopPodSandboxResponse) {}
    rpc RemovePodSandbox(RemovePodSandboxRequest) returns (RemovePodSandboxResponse) {}
    rpc PodSandboxStatus(PodSandboxStatusRequest) returns (PodSandboxStatusResponse) {}
    rpc ListPodSandbox(ListPodSandboxRequest) returns (ListPodSandboxResponse) {}
    rpc Status(StatusRequest) returns (StatusResponse) {}
}

service ImageService {
    rpc ImageStatus(ImageStatusRequest) returns (ImageStatusResponse) {}
}

message VersionRequest { string version = 1; }
message VersionResponse {
    string version = 1;
    string runtime_name = 2;
    string runtime_version = 3;
    string runtime_api_version = 4;
}

message DNSConfig {
    repeated string servers = 1;
    repeated string searches = 2;
    repeated string options = 3;
}

enum Protocol { TCP = 0; UDP = 1; SCTP = 2; }
message PortMapping {
    Protocol protocol = 1;
    int32 container_port = 2;
    int32 host_port = 3;
    string host_ip = 4;
}

enum NamespaceMode { POD = 0; CONTAINER = 1; NODE = 2; TARGET = 3; }
message NamespaceOption {
    NamespaceMode network = 1;
    NamespaceMode pid = 2;
    NamespaceMode ipc = 3;
    string target_id = 4;
}

message Int64Value { int64 value = 1; }

message SecurityProfile {
    enum ProfileType { RuntimeDefault = 0; Unconfined = 1; Localhost = 2; }
    ProfileType profile_type = 1;
    string localhost_ref = 2;
}

message LinuxSandboxSecurityContext {
    NamespaceOption namespace_options = 1;
    Int64Value run_as_user = 3;
    bool readonly_rootfs = 4;
    repeated int64 supplemental_groups = 5;
    bool privileged = 6;
    Int64Value run_as_group = 8;
    SecurityProfile seccomp = 9;
    SecurityProfile apparmor = 10;
}

message LinuxPodSandboxConfig {
    string cgroup_parent = 1;
    LinuxSandboxSecurityContext security_context = 2;
    map<string, string> sysctls = 3;
}

message PodSandboxMetadata {
    string name = 1;
    string uid = 2;
    string namespace = 3;
    uint32 attempt = 4;
}

message PodSandboxConfig {
    PodSandboxMetadata metadata = 1;
    string hostname = 2;
    string log_directory = 3;
    DNSConfig dns_config = 4;
    repeated PortMapping port_mappings = 5;
    map<string, string> labels = 6;
    map<string, string> annotations = 7;
    LinuxPodSandboxConfig linux = 8;
}

message RunPodSandboxRequest {
    PodSandboxConfig config = 1;
    string runtime_handler = 2;
}
message RunPodSandboxResponse { string pod_sandbox_id = 1; }

message StopPodSandboxRequest { string pod_sandbox_id = 1; }
message StopPodSandboxResponse {}

message RemovePodSandboxRequest { string pod_sandbox_id = 1; }
message RemovePodSandboxResponse {}

message PodSandboxStatusRequest {
    string pod_sandbox_id = 1;
    bool verbose = 2;
}
message PodIP { string ip = 1; }
message PodSandboxNetworkStatus {
    string ip = 1;
    repeated PodIP additional_ips = 2;
}
message Namespace { NamespaceOption options = 2; }
message LinuxPodSandboxStatus { Namespace namespaces = 1; }
enum PodSandboxState { SANDBOX_READY = 0; SANDBOX_NOTREADY = 1; }
message PodSandboxStatus {
    string id = 1;
    PodSandboxMetadata metadata = 2;
    PodSandboxState state = 3;
    int64 created_at = 4;
    PodSandboxNetworkStatus network = 5;
    LinuxPodSandboxStatus linux = 6;
    map<string, string> labels = 7;
    map<string, string> annotations = 8;
    string runtime_handler = 9;
}
message PodSandboxStatusResponse {
    PodSandboxStatus status = 1;
    map<string, string> info = 2;
}

message PodSandboxStateValue { PodSandboxState state = 1; }
message PodSandboxFilter {
    string id = 1;
    PodSandboxStateValue state = 2;
    map<string, string> label_selector = 3;
}
message ListPodSandboxRequest { PodSandboxFilter filter = 1; }
message PodSandbox {
    string id = 1;
    PodSandboxMetadata metadata = 2;
    PodSandboxState state = 3;
    int64 created_at = 4;
    map<string, string> labels = 5;
    map<string, string> annotations = 6;
    string runtime_handler = 7;
}
message ListPodSandboxResponse { repeated PodSandbox items = 1; }

message RuntimeCondition {
    string type = 1;
    bool status = 2;
    string reason = 3;
    string message = 4;
}
message RuntimeStatus { repeated RuntimeCondition conditions = 1; }
message StatusRequest { bool verbose = 1; }
message StatusResponse {
    RuntimeStatus status = 1;
    map<string, string> info = 2;
}

message ImageSpec {
    string image = 1;
    map<string, string> annotations = 2;
}
message Image {
    string id = 1;
    repeated string repo_tags = 2;
    repeated string repo_digests = 3;
    uint64 size = 4;
}
message ImageStatusRequest {
    ImageSpec image = 1;
    bool verbose = 2;
}
message ImageStatusResponse {
    Image image = 1;
    map<string, string> info = 2;
}
"""

MODULE = "podnet_cri_api"      # the generated podnet_cri_api_pb2 / podnet_cri_api_pb2_grpc
_lock = threading.Lock()
_api = None


def available():
    """None when grpcio and grpcio-tools import, else why not (a skip reason)."""
    try:
        import grpc  # noqa: F401
        import grpc_tools.protoc  # noqa: F401
    except ImportError as e:
        return "needs grpcio and grpcio-tools (the test extras: ./dev setup): %s" % e
    return None


def api():
    """(messages module, services module), compiled from PROTO on first use."""
    global _api
    with _lock:
        if _api is None:
            _api = _compile()
        return _api


def _compile():
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="podnet-cri-")
    atexit.register(shutil.rmtree, out, True)
    with open(os.path.join(out, MODULE + ".proto"), "w") as f:
        f.write(PROTO)
    rc = protoc.main(["protoc", "-I", out, "--python_out", out, "--grpc_python_out", out,
                      os.path.join(out, MODULE + ".proto")])
    if rc != 0:
        raise RuntimeError("protoc failed (%d) on the CRI subset" % rc)
    sys.path.insert(0, out)
    try:
        return importlib.import_module(MODULE + "_pb2"), importlib.import_module(MODULE + "_pb2_grpc")
    finally:
        sys.path.remove(out)


def sandbox_config(name, namespace, uid, attempt=0, hostname=None, log_directory="", labels=None,
                   annotations=None, dns_servers=(), dns_searches=(), cgroup_parent="", port_mappings=()):
    """A PodSandboxConfig as kubelet builds one for a pod with the pod network: the metadata
    that names the sandbox, kubelet's io.kubernetes.pod.* labels beside the pod's own, the
    hostname, the log directory, DNS, the pod's cgroup, its host ports (`port_mappings`:
    (protocol "TCP"/"UDP", container port, host port) for containers' hostPort fields) and
    the Linux security context (network and IPC namespaces of the pod, a PID namespace per
    container, the runtime's default seccomp profile)."""
    pb, _ = api()
    all_labels = dict(labels or {})
    all_labels.update({"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                       "io.kubernetes.pod.uid": uid})
    all_annotations = {"kubernetes.io/config.source": "api"}
    all_annotations.update(annotations or {})
    security = pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD),
        seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault))
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=attempt),
        hostname=hostname or name, log_directory=log_directory,
        dns_config=pb.DNSConfig(servers=list(dns_servers), searches=list(dns_searches), options=["ndots:5"]),
        port_mappings=[pb.PortMapping(protocol=pb.Protocol.Value(protocol), container_port=container_port,
                                      host_port=host_port) for protocol, container_port, host_port in port_mappings],
        labels=all_labels, annotations=all_annotations,
        linux=pb.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent, security_context=security))


class CriClient:
    """RuntimeService and ImageService over the runtime's unix socket; every call bounded by
    `timeout` seconds (gRPC deadlines), so a wedged runtime fails a test instead of hanging it."""

    def __init__(self, socket_path, timeout=30.0):
        import grpc

        pb, services = api()
        self.pb = pb
        self.timeout = timeout
        # gRPC's reconnect backoff starts at 1 s: too slow for a runtime that a test has just
        # (re)started, whose socket appears a few ms later
        self.channel = grpc.insecure_channel("unix://" + socket_path, options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 500)])
        self.runtime = services.RuntimeServiceStub(self.channel)
        self.images = services.ImageServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def version(self, timeout=None):
        return self.runtime.Version(self.pb.VersionRequest(version="v1"), timeout=timeout or self.timeout)

    def conditions(self):
        """{condition type: (status, reason, message)}: RuntimeReady, NetworkReady."""
        status = self.runtime.Status(self.pb.StatusRequest(), timeout=self.timeout).status
        return {c.type: (c.status, c.reason, c.message) for c in status.conditions}

    def run_pod_sandbox(self, config, runtime_handler=""):
        """The new sandbox's id."""
        reply = self.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
                                           timeout=self.timeout)
        return reply.pod_sandbox_id

    def stop_pod_sandbox(self, sandbox_id):
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def remove_pod_sandbox(self, sandbox_id):
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                      timeout=self.timeout)

    def pod_sandbox_status(self, sandbox_id, verbose=True):
        """(PodSandboxStatus, info): info's values are JSON texts, parsed here (containerd's
        "info" key holds the pid, the netns path, the CNI result and the runtime spec)."""
        reply = self.runtime.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                                              verbose=verbose), timeout=self.timeout)
        return reply.status, {key: json.loads(value) for key, value in reply.info.items()}

    def list_pod_sandbox(self, labels=None):
        request = self.pb.ListPodSandboxRequest(filter=self.pb.PodSandboxFilter(label_selector=labels or {}))
        return list(self.runtime.ListPodSandbox(request, timeout=self.timeout).items)

    def image_status(self, image):
        """The Image the runtime knows by that name, or None."""
        reply = self.images.ImageStatus(self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=image)),
                                        timeout=self.timeout)
        return reply.image if reply.image.id else None
