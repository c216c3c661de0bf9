/* Same-host redirect for bridge networks (owner: cnm.ebpf.redirect).
 *
 * Attached at TC ingress of each container's host-side veth. A frame from a container to
 * another container on this host skips the bridge: it goes straight into the destination
 * container's namespace with bpf_redirect_peer. Only pairs the bridge would let through
 * are taken: both endpoints on the same network and that network with inter-container
 * communication on. Everything else (other networks, enable_icc=false networks, the
 * gateway, the outside, non-IPv4) gets TC_ACT_OK and the bridge decides as before.
 */
#include "cnm_bpf.h"

/* Endpoint flags (mirrored in redirect.py). */
#define CNM_EP_ICC 0x1 /* the endpoint's network allows inter-container traffic */

/* The map value, mirrored in redirect.py (struct "<III6s6s"). */
struct cnm_endpoint {
	__u32 ifindex;            /* the endpoint's host-side veth */
	__u32 network;            /* the network's tag: equal tags, same network */
	__u32 flags;              /* CNM_EP_* */
	__u8 mac[CNM_ETH_ALEN];   /* the container's MAC: the frame's new destination */
	__u8 src_mac[CNM_ETH_ALEN]; /* source MAC to write; all zero keeps the sender's */
};

enum cnm_redirect_counter {
	CNM_REDIRECTED = 0,  /* handed to the destination container */
	CNM_MISS,            /* destination is not a local endpoint */
	CNM_POLICY,          /* other network, or ICC off: left to the bridge */
	CNM_NOT_IPV4,        /* ARP, IPv6, ...: left to the bridge */
	CNM_UNKNOWN_SOURCE,  /* source address not this port's endpoint */
	CNM_REDIRECT_FAILED, /* the redirect helper refused */
	CNM_REDIRECT_COUNTERS,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* IPv4 address, network byte order */
	__type(value, struct cnm_endpoint);
} cnm_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNM_REDIRECT_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} cnm_redirect_counters SEC(".maps");

/* Load-time configuration (set by the owner before load). */
/* Require the source address to belong to the port the frame came in on (anti-spoofing). */
const volatile __u32 cnm_verify_source = 1;

SEC("tc")
int cnm_redirect_ingress(struct __sk_buff *skb)
{
	struct ethhdr *eth = 0;
	struct iphdr *ip = cnm_ipv4(skb, &eth);
	struct cnm_endpoint *src, *dst;
	__u32 saddr, daddr;
	long rc;

	if (!ip) {
		CNM_COUNT(cnm_redirect_counters, CNM_NOT_IPV4);
		return TC_ACT_OK;
	}
	saddr = ip->saddr;
	daddr = ip->daddr;

	dst = bpf_map_lookup_elem(&cnm_endpoints, &daddr);
	if (!dst) {
		CNM_COUNT(cnm_redirect_counters, CNM_MISS);
		return TC_ACT_OK;
	}
	src = bpf_map_lookup_elem(&cnm_endpoints, &saddr);
	if (!src || (cnm_verify_source && src->ifindex != skb->ifindex)) {
		CNM_COUNT(cnm_redirect_counters, CNM_UNKNOWN_SOURCE);
		return TC_ACT_OK;
	}
	if (src->network != dst->network || !(src->flags & dst->flags & CNM_EP_ICC)) {
		CNM_COUNT(cnm_redirect_counters, CNM_POLICY);
		return TC_ACT_OK;
	}
	if (cnm_set_macs(skb, dst->mac, dst->src_mac) < 0) {
		CNM_COUNT(cnm_redirect_counters, CNM_REDIRECT_FAILED);
		return TC_ACT_OK;
	}
	rc = bpf_redirect_peer(dst->ifindex, 0);
	if (rc != TC_ACT_REDIRECT) {
		CNM_COUNT(cnm_redirect_counters, CNM_REDIRECT_FAILED);
		return TC_ACT_OK;
	}
	CNM_COUNT(cnm_redirect_counters, CNM_REDIRECTED);
	return TC_ACT_REDIRECT;
}

char LICENSE[] SEC("license") = "GPL";
