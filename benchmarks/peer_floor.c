/*
 * The kernel floor for programming overlay peers, in plain C with raw rtnetlink.
 *
 * Per remote peer i: one static FDB entry on the VXLAN device (AF_BRIDGE, NDA_LLADDR =
 * the peer's MAC, NDA_DST = its VTEP, NUD_PERMANENT | NUD_NOARP, NTF_SELF) and one
 * permanent neighbour (NDA_DST = the peer's IPv4, NDA_LLADDR = its MAC), the same
 * messages cnm's fast path sends (NLM_F_CREATE | NLM_F_REPLACE), in the same order (all
 * FDB entries, then all neighbours), batched, ACK only on each batch's last message;
 * then the deletions (FDB entries by MAC + VTEP, neighbours by IP). Peer i is
 *   IP 10.128.0.0 + 2 + i, MAC 02:42:0a:(i>>16):(i>>8):i, VTEP 198.19.(i>>8).(i&255 or 1)
 * as in benchmarks/bench_overlay.py. Built and run by that benchmark.
 *
 * usage: peer_floor NETNS_PATH VXLAN_IFINDEX N [ROUNDS [keep]]
 *   keep: after the timed rounds, add the entries once more and leave them (for checking)
 * prints: {"add_s": best add, "del_s": best delete, "errors": n}
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/neighbour.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_BRIDGE
#define AF_BRIDGE 7
#endif

#include "nl_floor.h"

static void peer_mac(int i, unsigned char mac[6]) {
    mac[0] = 0x02; mac[1] = 0x42; mac[2] = 0x0a;
    mac[3] = (i >> 16) & 255; mac[4] = (i >> 8) & 255; mac[5] = i & 255;
}

static void peer_vtep(int i, unsigned char ip[4]) {
    ip[0] = 198; ip[1] = 19; ip[2] = (i >> 8) & 255; ip[3] = (i & 255) ? (i & 255) : 1;
}

static void peer_ip(int i, unsigned char ip[4]) {
    unsigned v = (10u << 24 | 128u << 16) + 2 + i;
    ip[0] = v >> 24; ip[1] = (v >> 16) & 255; ip[2] = (v >> 8) & 255; ip[3] = v & 255;
}

/* Message k of 2N (FDB entries first, then neighbours), added or deleted. */
static void message(int k, int n, int ifindex, int add) {
    unsigned char mac[6], ip[4];
    int i = k < n ? k : k - n;
    peer_mac(i, mac);
    struct ndmsg nd = {.ndm_ifindex = ifindex};
    int type = add ? RTM_NEWNEIGH : RTM_DELNEIGH;
    int flags = add ? NLM_F_CREATE | NLM_F_REPLACE : 0;
    struct nlmsghdr *m;
    if (k < n) {
        nd.ndm_family = AF_BRIDGE;
        nd.ndm_flags = NTF_SELF;
        nd.ndm_state = add ? NUD_PERMANENT | NUD_NOARP : 0;
        m = begin(type, flags, &nd, sizeof nd);
        peer_vtep(i, ip);
        put_attr(m, NDA_LLADDR, mac, 6);
        put_attr(m, NDA_DST, ip, 4);
    } else {
        nd.ndm_family = AF_INET;
        nd.ndm_state = add ? NUD_PERMANENT : 0;
        m = begin(type, flags, &nd, sizeof nd);
        peer_ip(i, ip);
        put_attr(m, NDA_DST, ip, 4);
        if (add) put_attr(m, NDA_LLADDR, mac, 6);
    }
    finish(m);
}

static int program(int fd, int n, int ifindex, int add) {
    int errors = 0, in_chunk = 0;
    struct nlmsghdr *last = NULL;
    for (int k = 0; k < 2 * n; k++) {
        last = (struct nlmsghdr *)(buf + used);
        message(k, n, ifindex, add);
        if (++in_chunk == CHUNK_MSGS || used > CHUNK_BYTES - 256) {
            errors += flush(fd, last);
            in_chunk = 0;
        }
    }
    if (in_chunk) errors += flush(fd, last);
    return errors;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s NETNS_PATH VXLAN_IFINDEX N [ROUNDS]\n", argv[0]); return 2; }
    int nsfd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (nsfd < 0 || setns(nsfd, CLONE_NEWNET) < 0) { perror(argv[1]); return 1; }
    close(nsfd);
    int ifindex = atoi(argv[2]), n = atoi(argv[3]), rounds = argc > 4 ? atoi(argv[4]) : 1;
    int fd = open_rtnl(), errors = 0;
    double best_add = 1e9, best_del = 1e9;
    for (int r = 0; r < rounds; r++) {
        double t0 = now();
        errors += program(fd, n, ifindex, 1);
        double t1 = now();
        errors += program(fd, n, ifindex, 0);
        double t2 = now();
        if (t1 - t0 < best_add) best_add = t1 - t0;
        if (t2 - t1 < best_del) best_del = t2 - t1;
    }
    if (argc > 5 && strcmp(argv[5], "keep") == 0) errors += program(fd, n, ifindex, 1);
    printf("{\"add_s\": %.6f, \"del_s\": %.6f, \"errors\": %d}\n", best_add, best_del, errors);
    return 0;
}
