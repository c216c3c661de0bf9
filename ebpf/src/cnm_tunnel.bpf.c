/* Overlay tunnel over one collect-metadata (external) vxlan device (owner: cnm.ebpf.tunnel).
 *
 * cnm_tunnel_egress runs at TC ingress of each overlay container's host-side veth: a frame
 * to a peer on another host gets its tunnel key (remote VTEP, VNI) set from cnm_tun_peers
 * and is redirected to the vxlan device, which encapsulates it; a frame to a container of
 * the same VNI on this host goes straight to it. cnm_tunnel_ingress runs at TC ingress of
 * the vxlan device: a decapsulated frame whose VNI matches a local endpoint goes into
 * that container's namespace with bpf_redirect_peer. Frames between different VNIs are
 * never carried.
 *
 * cnm_tunnel_decap (the RX accelerator) runs at TC ingress of the host device holding the
 * local VTEP address: a VXLAN frame the kernel would surely accept and that
 * cnm_tunnel_ingress would deliver (from a known peer's VTEP, to a local container of its
 * VNI) is decapsulated right there and sent with bpf_redirect_peer through the port's
 * uplink veth pair into the tunnel namespace, where cnm_tunnel_uplink (TC ingress of the
 * pair's tunnel end) puts it into its container. Everything else passes on untouched
 * (TC_ACT_UNSPEC: the next program, then the stack and the vxlan device): without the
 * accelerator the same frames take the vxlan device's path, only slower.
 *
 * There is no bridge, so cnm_tunnel_egress also answers ARP: a request from a known local
 * container for an address of its VNI (a local container or a remote peer) is turned into
 * the reply in place and sent back out of the port it came in on. Every other ARP frame
 * is left to the stack (which drops it): nothing ARP ever crosses the tunnel.
 */
#include "cnm_bpf.h"

/* From linux/if_arp.h, which pulls in libc headers a BPF build cannot use. */
#define CNM_ARPHRD_ETHER 1
#define CNM_ARPOP_REQUEST 1
#define CNM_ARPOP_REPLY 2

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
	CNM_TUN_MISS,         /* destination (or ARP target) unknown: left to the stack */
	CNM_TUN_NOT_IPV4,     /* neither IPv4 nor an ARP request it answers or counts below */
	CNM_TUN_UNKNOWN_SOURCE, /* source (or ARP sender) not this port's endpoint */
	CNM_VNI_MISMATCH,     /* source and destination on different VNIs: dropped (an ARP
	                       * request across VNIs is left unanswered) */
	CNM_TUN_FAILED,       /* a helper refused */
	CNM_ARP_REPLIED,      /* an ARP request answered from the maps */
	CNM_DECAP_FAST,       /* decapsulated at the underlay and delivered (the accelerator) */
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

/* The accelerator's configuration (mirrored in tunnel.py, struct "<4sI"), set with the
 * uplink pair; vtep 0 turns cnm_tunnel_decap off. */
struct cnm_tun_decap {
	__u32 vtep;   /* the local VTEP address, IPv4, network byte order */
	__u32 device; /* the host device cnm_tunnel_decap is on (the owner's note) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cnm_tun_decap);
} cnm_tun_decap SEC(".maps");

/* The uplink pair's host-namespace end (entry 0). A device map: the kernel drops the
 * entry when the device goes, and cnm_tunnel_decap then passes every frame on. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); /* ifindex */
} cnm_tun_uplink SEC(".maps");

/* Load-time configuration (set by the owner before load). */
const volatile __u32 cnm_vxlan_ifindex = 0; /* the external vxlan device */
const volatile __u32 cnm_vxlan_port = 4789; /* its UDP port (cnm_tunnel_decap) */
const volatile __u8 cnm_tunnel_ttl = 64;    /* outer TTL */
const volatile __u32 cnm_verify_source = 1; /* source must belong to the ingress port */

/* The kernel accepts this size since 4.x; the local_ipv4 tail came later. */
#define CNM_TUNNEL_KEY_SIZE __builtin_offsetof(struct bpf_tunnel_key, local_ipv4)

/* Make `mac` the frame's destination, writing the packet only when it differs (a frame
 * addressed from an ARP answer of this program already carries it): no helper call on
 * the fast path. `eth` was bounds-checked by cnm_ipv4. */
static __always_inline void cnm_set_dst(struct ethhdr *eth, const __u8 *mac)
{
	__u32 hi;
	__u16 lo;

	__builtin_memcpy(&hi, mac, 4);
	__builtin_memcpy(&lo, mac + 4, 2);
	if (*(__u32 *)eth->h_dest == hi && *(__u16 *)(eth->h_dest + 4) == lo)
		return;
	__builtin_memcpy(eth->h_dest, mac, CNM_ETH_ALEN);
}

static __always_inline int cnm_deliver(struct ethhdr *eth, struct cnm_tun_local *dst)
{
	cnm_set_dst(eth, dst->mac);
	return bpf_redirect_peer(dst->ifindex, 0) == TC_ACT_REDIRECT ? 0 : -1;
}

/* An Ethernet/IPv4 ARP packet after its Ethernet header. */
struct cnm_arp {
	__be16 ar_hrd; /* hardware type */
	__be16 ar_pro; /* protocol type */
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
	__u8 sha[CNM_ETH_ALEN];
	__u8 spa[4];
	__u8 tha[CNM_ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

#define CNM_ARP_FRAME (sizeof(struct ethhdr) + sizeof(struct cnm_arp))

/* Answer an ARP request from the maps: turn the frame into the reply in place and send it
 * back out of the port it came from (into the requesting container). TC_ACT_OK for every
 * frame it does not answer. */
static __always_inline int cnm_arp_reply(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct cnm_arp *arp = (void *)(eth + 1);
	struct cnm_tun_local *src, *local;
	struct cnm_tun_peer *peer;
	__u8 requester[CNM_ETH_ALEN];
	const __u8 *answer;
	__u32 sender, target, vni;

	if (data + CNM_ARP_FRAME > data_end) {
		if (bpf_skb_pull_data(skb, CNM_ARP_FRAME) < 0)
			goto other;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		arp = (void *)(eth + 1);
		if (data + CNM_ARP_FRAME > data_end)
			goto other;
	}
	if (arp->ar_hrd != bpf_htons(CNM_ARPHRD_ETHER) || arp->ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->ar_hln != CNM_ETH_ALEN || arp->ar_pln != 4 ||
	    arp->ar_op != bpf_htons(CNM_ARPOP_REQUEST))
		goto other;
	__builtin_memcpy(&sender, arp->spa, 4);
	__builtin_memcpy(&target, arp->tpa, 4);
	if (sender == target) /* gratuitous */
		goto other;
	src = bpf_map_lookup_elem(&cnm_tun_local, &sender);
	if (!src || (cnm_verify_source && src->ifindex != skb->ifindex)) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_UNKNOWN_SOURCE);
		return TC_ACT_OK;
	}
	vni = src->vni;
	local = bpf_map_lookup_elem(&cnm_tun_local, &target);
	if (local) {
		if (local->vni != vni)
			goto mismatch;
		answer = local->mac;
	} else {
		peer = bpf_map_lookup_elem(&cnm_tun_peers, &target);
		if (!peer) {
			CNM_COUNT(cnm_tunnel_counters, CNM_TUN_MISS);
			return TC_ACT_OK;
		}
		if (peer->vni != vni)
			goto mismatch;
		answer = peer->mac;
	}
	if (cnm_mac_is_zero(answer))
		goto other;

	/* The reply: from the answered address to the requester. */
	__builtin_memcpy(requester, arp->sha, CNM_ETH_ALEN);
	__builtin_memcpy(eth->h_dest, requester, CNM_ETH_ALEN);
	__builtin_memcpy(eth->h_source, answer, CNM_ETH_ALEN);
	arp->ar_op = bpf_htons(CNM_ARPOP_REPLY);
	__builtin_memcpy(arp->tha, requester, CNM_ETH_ALEN);
	__builtin_memcpy(arp->tpa, &sender, 4);
	__builtin_memcpy(arp->sha, answer, CNM_ETH_ALEN);
	__builtin_memcpy(arp->spa, &target, 4);
	CNM_COUNT(cnm_tunnel_counters, CNM_ARP_REPLIED);
	return bpf_redirect(skb->ifindex, 0);

mismatch:
	CNM_COUNT(cnm_tunnel_counters, CNM_VNI_MISMATCH);
	return TC_ACT_OK;
other:
	CNM_COUNT(cnm_tunnel_counters, CNM_TUN_NOT_IPV4);
	return TC_ACT_OK;
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
		if (skb->protocol == bpf_htons(ETH_P_ARP))
			return cnm_arp_reply(skb);
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
		if (cnm_deliver(eth, local) < 0) {
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
	cnm_set_dst(eth, peer->mac);
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
	if (cnm_deliver(eth, dst) < 0) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	CNM_COUNT(cnm_tunnel_counters, CNM_DECAPSULATED);
	return TC_ACT_REDIRECT;
}

/* The headers cnm_tunnel_decap reads, outer Ethernet to inner IPv4 (no IP options). */
struct cnm_vxlan_frame {
	struct ethhdr eth;
	struct iphdr ip;
	__be16 sport;
	__be16 dport;
	__be16 ulen;
	__sum16 check;
	__be32 vx_flags;
	__be32 vx_vni;
	struct ethhdr inner_eth;
	struct iphdr inner_ip;
} __attribute__((packed));

#define CNM_VXLAN_OUTER (sizeof(struct iphdr) + 8 + 8 + sizeof(struct ethhdr))
#define CNM_VXLAN_I_FLAG 0x08000000
#define CNM_IP_CE 3
#define CNM_IP_MF_OFFSET 0x3fff /* more fragments, fragment offset */
#define CNM_PACKET_HOST 0
#define CNM_IPPROTO_UDP 17 /* linux/in.h pulls in libc headers */

/* The outer IPv4 header checksum holds (ip_rcv drops the frame otherwise). */
static __always_inline int cnm_ip_csum_ok(void *ip)
{
	__s64 sum = bpf_csum_diff(0, 0, ip, sizeof(struct iphdr), 0);

	if (sum < 0)
		return 0;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

SEC("tc")
int cnm_tunnel_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct cnm_vxlan_frame *f = data;
	struct cnm_tun_decap *cfg;
	__u32 *uplink_dev;
	struct cnm_tun_local *dst;
	struct cnm_tun_peer *peer;
	struct ethhdr *eth;
	__u8 src_mac[CNM_ETH_ALEN];
	__u32 zero = 0, vni, daddr, saddr, uplink;

	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->pkt_type != CNM_PACKET_HOST ||
	    skb->vlan_present || skb->gso_size)
		return TC_ACT_UNSPEC;
	if ((void *)(f + 1) > data_end) {
		if (skb->len < sizeof(*f) || bpf_skb_pull_data(skb, sizeof(*f)) < 0)
			return TC_ACT_UNSPEC;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		f = data;
		if ((void *)(f + 1) > data_end)
			return TC_ACT_UNSPEC;
	}
	/* The outer headers, as the stack and the vxlan device would take them. */
	if (f->eth.h_proto != bpf_htons(ETH_P_IP) || f->ip.version != 4 || f->ip.ihl != 5 ||
	    f->ip.protocol != CNM_IPPROTO_UDP || (f->ip.frag_off & bpf_htons(CNM_IP_MF_OFFSET)) ||
	    (f->ip.tos & CNM_IP_CE) == CNM_IP_CE)
		return TC_ACT_UNSPEC;
	if (f->dport != bpf_htons(cnm_vxlan_port) || f->check != 0 ||
	    f->vx_flags != bpf_htonl(CNM_VXLAN_I_FLAG) || (f->vx_vni & bpf_htonl(0xff)))
		return TC_ACT_UNSPEC;
	if (bpf_ntohs(f->ip.tot_len) != skb->len - sizeof(struct ethhdr) ||
	    bpf_ntohs(f->ulen) != skb->len - sizeof(struct ethhdr) - sizeof(struct iphdr))
		return TC_ACT_UNSPEC;
	cfg = bpf_map_lookup_elem(&cnm_tun_decap, &zero);
	if (!cfg || !cfg->vtep || f->ip.daddr != cfg->vtep)
		return TC_ACT_UNSPEC;
	/* The inner frame: IPv4 from a known peer behind this VTEP to a local container,
	 * all of the frame's VNI. */
	if (f->inner_eth.h_proto != bpf_htons(ETH_P_IP) || f->inner_ip.version != 4)
		return TC_ACT_UNSPEC;
	vni = bpf_ntohl(f->vx_vni) >> 8;
	daddr = f->inner_ip.daddr;
	saddr = f->inner_ip.saddr;
	dst = bpf_map_lookup_elem(&cnm_tun_local, &daddr);
	if (!dst || dst->vni != vni)
		return TC_ACT_UNSPEC;
	peer = bpf_map_lookup_elem(&cnm_tun_peers, &saddr);
	if (!peer || peer->vni != vni || peer->vtep != f->ip.saddr)
		return TC_ACT_UNSPEC;
	if (!cnm_ip_csum_ok((void *)f + sizeof(struct ethhdr)))
		return TC_ACT_UNSPEC;
	uplink_dev = bpf_map_lookup_elem(&cnm_tun_uplink, &zero);
	if (!uplink_dev)
		return TC_ACT_UNSPEC;
	uplink = *uplink_dev;
	__builtin_memcpy(src_mac, f->inner_eth.h_source, CNM_ETH_ALEN);

	/* Off with outer IPv4, UDP, VXLAN and the inner Ethernet header; the outer Ethernet
	 * header stays and becomes the inner one. The checksum state follows the kernel's
	 * decapsulation: one verified level (the outer UDP) less. */
	if (bpf_skb_adjust_room(skb, -(__s32)CNM_VXLAN_OUTER, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_NO_CSUM_RESET) < 0) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	bpf_csum_level(skb, BPF_CSUM_LEVEL_DEC);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(eth->h_dest, dst->mac, CNM_ETH_ALEN);
	__builtin_memcpy(eth->h_source, src_mac, CNM_ETH_ALEN);
	if (bpf_redirect_peer(uplink, 0) != TC_ACT_REDIRECT) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	CNM_COUNT(cnm_tunnel_counters, CNM_DECAP_FAST);
	return TC_ACT_REDIRECT;
}

/* The second half of the accelerator: a frame cnm_tunnel_decap sent through the uplink
 * pair goes into its container (the endpoint may have left in between: dropped). */
SEC("tc")
int cnm_tunnel_uplink(struct __sk_buff *skb)
{
	struct ethhdr *eth = 0;
	struct iphdr *ip = cnm_ipv4(skb, &eth);
	struct cnm_tun_local *dst;
	__u32 daddr;

	if (!ip) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_NOT_IPV4);
		return TC_ACT_SHOT;
	}
	daddr = ip->daddr;
	dst = bpf_map_lookup_elem(&cnm_tun_local, &daddr);
	if (!dst) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_MISS);
		return TC_ACT_SHOT;
	}
	if (cnm_deliver(eth, dst) < 0) {
		CNM_COUNT(cnm_tunnel_counters, CNM_TUN_FAILED);
		return TC_ACT_SHOT;
	}
	return TC_ACT_REDIRECT;
}

char LICENSE[] SEC("license") = "GPL";
