/*
 * The kernel floor for a batched container attach, in plain C with raw rtnetlink.
 *
 * Does exactly what cnm.fastpath.bulk.attach does, with nothing in between: one host
 * batch of RTM_NEWLINK veth pairs (peer created inside its namespace as eth0 with a fixed
 * ifindex, host end on the bridge, in a group, up; ACK only on each chunk's last
 * message), then for each namespace: setns, a socket, one batch (address, link up,
 * default route), the ACK. Built and run by benchmarks/bench_fastpath.py.
 *
 * usage: attach_floor MODE BRIDGE_IFINDEX GROUP PREFIX_10_X NETNS_PATH...
 *   MODE batch       the namespaces exist; one host batch, then one batch per namespace
 *   MODE create      the same, after creating the namespaces (unshare + bind mount, lo up)
 *   MODE sequential  one container at a time: host message, ACK, namespace batch, ACK
 * prints: {"attach_s": seconds, "p50_ms": per-container median (sequential), "errors": n,
 *          "each_ms": per-container times, sorted (sequential; 0 otherwise)}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_link.h>
#include <linux/neighbour.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <net/if.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nl_floor.h"

static void host_veth(int i, unsigned bridge, unsigned group, int nsfd) {
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
    struct nlmsghdr *m = begin(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifi, sizeof ifi);
    char name[IFNAMSIZ];
    snprintf(name, sizeof name, "vf%u.%d", group & 0xfff, i % 100000);
    put_attr(m, IFLA_IFNAME, name, strlen(name) + 1);
    put_attr(m, IFLA_MASTER, &bridge, 4);
    put_attr(m, IFLA_GROUP, &group, 4);
    struct rtattr *li = nest_begin(m, IFLA_LINKINFO);
    put_attr(m, IFLA_INFO_KIND, "veth", 5);
    struct rtattr *data = nest_begin(m, IFLA_INFO_DATA);
    struct rtattr *peer = nest_begin(m, VETH_INFO_PEER);
    struct ifinfomsg pifi = {.ifi_family = AF_UNSPEC};
    memcpy((char *)m + m->nlmsg_len, &pifi, sizeof pifi);
    m->nlmsg_len += sizeof pifi;
    put_attr(m, IFLA_IFNAME, "eth0", 5);
    unsigned fd = nsfd;
    put_attr(m, IFLA_NET_NS_FD, &fd, 4);
    nest_end(m, peer);
    nest_end(m, data);
    nest_end(m, li);
    finish(m);
}

/* Inside the namespace: address, up, default route; eth0 is index 2 in a fresh one. */
static int sandbox_config(int nsfd, int home, int i, unsigned octet) {
    if (setns(nsfd, CLONE_NEWNET) < 0) { perror("setns"); exit(1); }
    int fd = open_rtnl();
    unsigned host_no = i + 2;
    struct ifaddrmsg ifa = {.ifa_family = AF_INET, .ifa_prefixlen = 16, .ifa_index = 2};
    struct nlmsghdr *m = begin(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &ifa, sizeof ifa);
    unsigned char ip[4] = {10, octet, host_no >> 8, host_no & 255};
    unsigned char brd[4] = {10, octet, 255, 255};
    put_attr(m, IFA_LOCAL, ip, 4);
    put_attr(m, IFA_ADDRESS, ip, 4);
    put_attr(m, IFA_BROADCAST, brd, 4);
    finish(m);
    struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_index = 2, .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
    m = begin(RTM_NEWLINK, 0, &ifi, sizeof ifi);
    finish(m);
    struct rtmsg rt = {.rtm_family = AF_INET, .rtm_table = RT_TABLE_MAIN, .rtm_protocol = RTPROT_STATIC,
                       .rtm_scope = RT_SCOPE_UNIVERSE, .rtm_type = RTN_UNICAST};
    m = begin(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &rt, sizeof rt);
    unsigned char gw[4] = {10, octet, 0, 1};
    unsigned oif = 2;
    put_attr(m, RTA_GATEWAY, gw, 4);
    put_attr(m, RTA_OIF, &oif, 4);
    finish(m);
    int errors = flush(fd, m);
    close(fd);
    if (setns(home, CLONE_NEWNET) < 0) { perror("setns home"); exit(1); }
    return errors;
}

/* A namespace at `path` without a process: unshare, bind mount, loopback up. */
static void create_netns(const char *path, int home) {
    int fd = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
    if (fd < 0) { perror(path); exit(1); }
    close(fd);
    if (unshare(CLONE_NEWNET) < 0) { perror("unshare"); exit(1); }
    if (mount("/proc/thread-self/ns/net", path, NULL, MS_BIND, NULL) < 0) { perror("mount"); exit(1); }
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    ioctl(s, SIOCGIFFLAGS, &ifr);
    ifr.ifr_flags |= IFF_UP;
    ioctl(s, SIOCSIFFLAGS, &ifr);
    close(s);
    if (setns(home, CLONE_NEWNET) < 0) { perror("setns home"); exit(1); }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s MODE BRIDGE GROUP NET_OCTET NETNS...\n", argv[0]); return 2; }
    const char *mode = argv[1];
    unsigned bridge = atoi(argv[2]), group = atoi(argv[3]), octet = atoi(argv[4]);
    int n = argc - 5, errors = 0;
    char **paths = argv + 5;
    int *fds = calloc(n, sizeof *fds);
    double *each = calloc(n, sizeof *each);
    int home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    double t0 = now();
    if (strcmp(mode, "create") == 0)
        for (int i = 0; i < n; i++) create_netns(paths[i], home);
    for (int i = 0; i < n; i++)
        if ((fds[i] = open(paths[i], O_RDONLY | O_CLOEXEC)) < 0) { perror(paths[i]); return 1; }
    int host = open_rtnl();
    if (strcmp(mode, "sequential") == 0) {
        for (int i = 0; i < n; i++) {
            double s = now();
            host_veth(i, bridge, group, fds[i]);
            errors += flush(host, (struct nlmsghdr *)buf);
            errors += sandbox_config(fds[i], home, i, octet);
            each[i] = now() - s;
        }
    } else {
        struct nlmsghdr *last = NULL;
        int in_chunk = 0;
        for (int i = 0; i < n; i++) {
            last = (struct nlmsghdr *)(buf + used);
            host_veth(i, bridge, group, fds[i]);
            if (++in_chunk == CHUNK_MSGS || used > CHUNK_BYTES - 512) { errors += flush(host, last); in_chunk = 0; }
        }
        if (in_chunk) errors += flush(host, last);
        for (int i = 0; i < n; i++) errors += sandbox_config(fds[i], home, i, octet);
    }
    double total = now() - t0;
    qsort(each, n, sizeof *each, cmp_double);
    printf("{\"attach_s\": %.6f, \"p50_ms\": %.4f, \"errors\": %d, \"each_ms\": [", total,
           each[n / 2] * 1000, errors);
    for (int i = 0; i < n; i++) printf("%s%.4f", i ? ", " : "", each[i] * 1000);
    printf("]}\n");
    return 0;
}
