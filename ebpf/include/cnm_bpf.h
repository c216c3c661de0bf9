/* Shared by cnm's BPF programs: uapi includes, packet parsing, per-CPU counters.
 *
 * Only uapi headers (linux-libc-dev) and libbpf's bpf_helpers.h are used: programs read
 * packets through struct __sk_buff, so no vmlinux.h and no kernel headers are needed.
 */
#ifndef CNM_BPF_H
#define CNM_BPF_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define CNM_ETH_ALEN 6

/* Bump the per-CPU counter `index` of an array map of __u64 values. */
#define CNM_COUNT(map, index)                                          \
	do {                                                           \
		__u32 __cnm_key = (index);                             \
		__u64 *__cnm_val = bpf_map_lookup_elem(&(map), &__cnm_key); \
		if (__cnm_val)                                         \
			*__cnm_val += 1;                               \
	} while (0)

/* The IPv4 header of an Ethernet frame, or NULL when the frame carries no IPv4. The
 * verifier needs the bounds checks against data_end before any byte is read. */
static __always_inline struct iphdr *cnm_ipv4(struct __sk_buff *skb, struct ethhdr **eth_out)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return 0;
	if (ip->version != 4)
		return 0;
	*eth_out = eth;
	return ip;
}

static __always_inline int cnm_mac_is_zero(const __u8 *mac)
{
	return (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]) == 0;
}

/* Write the destination (and, when given, the source) MAC of the frame in place. */
static __always_inline int cnm_set_macs(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	if (bpf_skb_store_bytes(skb, __builtin_offsetof(struct ethhdr, h_dest), dst, CNM_ETH_ALEN, 0))
		return -1;
	if (src && !cnm_mac_is_zero(src) &&
	    bpf_skb_store_bytes(skb, __builtin_offsetof(struct ethhdr, h_source), src, CNM_ETH_ALEN, 0))
		return -1;
	return 0;
}

#endif
