/* Overlay tunnel over one collect-metadata (external) vxlan device (owner: cnm.ebpf.tunnel).
 *
 * cnm_tunnel_egress runs at TC ingress of each overlay container's host-side veth: a frame
 * to a peer on another host gets its tunnel key (remote VTEP, VNI) set from cnm_tun_peers
 * and is redirected to the vxlan device, which encapsulates it; a frame to a container of
 * the same VNI on this host goes straight to it. cnm_tunnel_ingress runs at TC ingress of
 * the vxlan device: a decapsulated frame whose VNI matches a local endpoint goes into
 * that container's namespace with bpf_redirect_peer. Frames between different VNIs are
 * never carried. Neighbour (ARP) entries inside the containers come from the control plane.
 */
#include "cnm_bpf.h"

/* A container of this host (mirrored in tunnel.py, struct "<II6s2x"). */
struct cnm_tun_local {
	__u32 ifindex; /* its host-side veth */
	__u32 vni;
	__u8 mac[CNM_ETH_ALEN];
	__u8 pad[2];
};

/* A container on another host (mirrored in tunnel.py, struct "<4sI6s2x"). */
struct cnm_tun_peer {
	__u32 vtep; /* the remote host's tunnel endpoint, IPv4, network byte order */
	__u32 vni;
	__u8 mac[CNM_ETH_ALEN];
	__u8 pad[2];
};

enum cnm_tunnel_counter {
	CNM_ENCAPSULATED = 0, /* sent to a remote VTEP */
	CNM_DECAPSULATED,     /* delivered from the tunnel to a local container */
	CNM_LOCAL,            /* same VNI, same host: delivered directly */
	CNM_TUN_MISS,         /* destination unknown: left to the stack */
	CNM_TUN_NOT_IPV4,
	CNM_TUN_UNKNOWN_SOURCE,
	CNM_VNI_MISMATCH,     /* source and destination on different VNIs: dropped */
	CNM_TUN_FAILED,       /* a helper refused */
	CNM_TUNNEL_COUNTERS,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* IPv4 address, network byte order */
	__type(value, struct cnm_tun_local);
} cnm_tun_local SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* IPv4 address, network byte order */
	__type(value, struct cnm_tun_peer);
} cnm_tun_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNM_TUNNEL_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} cnm_tunnel_counters SEC(".maps");

/* Load-time configuration (set by the owner before load). */
const volatile __u32 cnm_vxlan_ifindex = 0; /* the external vxlan device */
const volatile __u8 cnm_tunnel_ttl = 64;    /* outer TTL */
const volatile __u32 cnm_verify_source = 1; /* source must belong to the ingress port */

/* The kernel accepts this size since 4.x; the local_ipv4 tail came later. */
#define CNM_TUNNEL_KEY_SIZE __builtin_offsetof(struct bpf_tunnel_key, local_ipv4)

static __always_inline int cnm_deliver(struct __sk_buff *skb, struct cnm_tun_local *dst)
{
	if (cnm_set_macs(skb, dst->mac, 0) < 0)
		return -1;
	return bpf_redirect_peer(dst->ifindex, 0) == TC_ACT_REDIRECT ? 0 : -1;
}

SEC("tc")
int cnm_tunnel_egress(struct __sk_buff *skb)
{
	struct ethhdr *eth = 0;
	struct iphdr *ip = cnm_ipv4(skb, &eth);
	struct cnm_tun_local *src, *local;
	struct cnm_tun_peer *peer;
	struct bpf_tunnel_key key = {};
	__u32 saddr, daddr;

	if (!ip) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_NOT_IPV4);
		return TC_ACT_OK;
	}
	saddr = ip->saddr;
	daddr = ip->daddr;
	src = bpf_map_lookup_elem(&cnm_tun_local, &saddr);
	if (!src || (cnm_verify_source && src->ifindex != skb->ifindex)) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_UNKNOWN_SOURCE);
		return TC_ACT_OK;
	}

	local = bpf_map_lookup_elem(&cnm_tun_local, &daddr);
	if (local) {
		if (local->vni != src->vni) {
			CNM_COUNT(cnm_tunnel_counters, CNM_VNI_MISMATCH);
			return TC_ACT_SHOT;
		}
		if (cnm_deliver(skb, local) < 0) {
			CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
			return TC_ACT_SHOT;
		}
		CNM_COUNT(cnm_tunnel_counters, CNM_LOCAL);
		return TC_ACT_REDIRECT;
	}

	peer = bpf_map_lookup_elem(&cnm_tun_peers, &daddr);
	if (!peer) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_MISS);
		return TC_ACT_OK;
	}
	if (peer->vni != src->vni) {
		CNM_COUNT(cnm_tunnel_counters, CNM_VNI_MISMATCH);
		return TC_ACT_SHOT;
	}
	if (cnm_set_macs(skb, peer->mac, 0) < 0) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	key.tunnel_id = peer->vni;
	key.remote_ipv4 = bpf_ntohl(peer->vtep);
	key.tunnel_ttl = cnm_tunnel_ttl;
	if (bpf_skb_set_tunnel_key(skb, &key, CNM_TUNNEL_KEY_SIZE, BPF_F_ZERO_CSUM_TX) < 0) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	CNM_COUNT(cnm_tunnel_counters, CNM_ENCAPSULATED);
	return bpf_redirect(cnm_vxlan_ifindex, 0);
}

SEC("tc")
int cnm_tunnel_ingress(struct __sk_buff *skb)
{
	struct ethhdr *eth = 0;
	struct iphdr *ip;
	struct cnm_tun_local *dst;
	struct bpf_tunnel_key key = {};
	__u32 daddr;

	if (bpf_skb_get_tunnel_key(skb, &key, CNM_TUNNEL_KEY_SIZE, 0) < 0) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_MISS);
		return TC_ACT_OK;
	}
	ip = cnm_ipv4(skb, &eth);
	if (!ip) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_NOT_IPV4);
		return TC_ACT_OK;
	}
	daddr = ip->daddr;
	dst = bpf_map_lookup_elem(&cnm_tun_local, &daddr);
	if (!dst) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_MISS);
		return TC_ACT_OK;
	}
	if (dst->vni != key.tunnel_id) {
		CNM_COUNT(cnm_tunnel_counters, CNM_VNI_MISMATCH);
		return TC_ACT_SHOT;
	}
	if (cnm_deliver(skb, dst) < 0) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	CNM_COUNT(cnm_tunnel_counters, CNM_DECAPSULATED);
	return TC_ACT_REDIRECT;
}

char LICENSE[] SEC("license") = "GPL";
