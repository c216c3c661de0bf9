"""cnm.ebpf: the optional BPF data path. Never imports cnm.control.

Layout
    src/*.bpf.c, include/   the programs (C, uapi headers only, BTF map definitions,
                            configured by const volatile globals at load time)
    *.bpf.o                 built by setup.py with clang (build.py has the rules); without
                            clang the package installs and loading says "objects not built"
    loader.py               libbpf.so.1 through cffi (ABI mode): BpfObject, Map, Program,
                            bpffs + pins, TC attach/detach/query (tcx hooks on kernels
                            6.6+, the clsact hook otherwise; CNM_BPF_TCX=0 forces clsact)
    probe.py                what this kernel supports: probe() -> EbpfProbe(ok, reason, verdict)
    redirect.py tunnel.py   the owners of cnm_redirect.bpf.c and cnm_tunnel.bpf.c
    errors.py               typed errors (EbpfError and its subclasses)

API for the controller and drivers (ebpf="auto|on|off")

    from cnm.ebpf import probe, errors
    from cnm.ebpf.redirect import RedirectOwner, RedirectEndpoint, network_tag

    result = probe.probe()        # .ok, .reason, .verdict ("ok" | "skip" | "fail"), .checks
    # auto: use the BPF path only when result.ok;  on: probe.require() raises FeatureMissing

    owner = RedirectOwner(pin_root="/sys/fs/bpf/cnm")   # one per host (per process is fine)
    owner.load()                  # loads + pins once, or picks up the pins (owner.picked_up)
    owner.add_endpoint(RedirectEndpoint(address, host_veth_ifindex, container_mac,
                                        network_tag(network_id), icc=network_icc))
    owner.attach(host_veth_ifindex, netns=None)   # TC ingress of the container's host veth
    owner.counters()              # RedirectCounters(redirected, miss, policy, ...).passed
    owner.remove_endpoint(address); owner.detach(host_veth_ifindex, netns=None)
    owner.close()                 # handles go; pins and attachments stay for the next owner
    owner.unpin()                 # forget the pins (e.g. when the last bridge network goes)

    Add the endpoint before attaching its port. Entries are keyed by IPv4 address: one
    entry per local container. Only same network tag + icc=True pairs are redirected; all
    else (other networks, enable_icc=false, gateway, outside, IPv6, ARP) stays on the bridge.

    from cnm.ebpf.tunnel import TunnelOwner, TunnelEndpoint, TunnelPeer
    tun = TunnelOwner(vxlan_ifindex, pin_root)   # one collect-metadata (external) vxlan device
    tun.load(); tun.attach_vxlan(netns=host_ns)
    tun.add_endpoint(TunnelEndpoint(address, host_veth_ifindex, mac, vni))
    tun.attach_endpoint(host_veth_ifindex, netns=host_ns)
    tun.add_peer(TunnelPeer(address, remote_vtep, mac, vni)); tun.remove_peer(address)
    tun.counters()                # TunnelCounters(encapsulated, decapsulated, ...)

    cnm_tunnel_egress answers the containers' ARP requests for local endpoints and peers
    of their own VNI from the maps (no neighbour entries needed); the container MTU must
    fit the vxlan device's.

Errors (cnm.ebpf.errors, all EbpfError): ObjectsNotBuilt, LibbpfUnavailable, ObjectError,
LoadError, VerifierError(.program, .log), MapError, PinError, AttachError, NotLoaded,
NotFound (LookupError), InvalidArgument (ValueError), FeatureMissing; `.errno` when a
system call failed. A failed load or attach changes nothing that was attached before.
"""
