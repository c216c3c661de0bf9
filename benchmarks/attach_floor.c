/*
 * The kernel floor for a batched container attach, in plain C with raw rtnetlink.
 *
 * Does exactly what cnm.fastpath.bulk.attach does, with nothing in between: one host
 * batch of RTM_NEWLINK veth pairs (peer created inside its namespace as eth0 with a fixed
 * ifindex, host end on the bridge, in a group, up; ACK only on each chunk's last
 * message), then for each namespace: setns, a socket, one batch (address, link up,
 * default route), the ACK. Built and run by benchmarks/bench_fastpath.py.
 *
 * usage: attach_floor BRIDGE_IFINDEX GROUP PREFIX_10_X NETNS_PATH...
 * prints: {"attach_s": seconds, "errors": n}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_link.h>
#include <linux/neighbour.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK_BYTES (96 * 1024)
#define CHUNK_MSGS 512

static char buf[CHUNK_BYTES + 4096];
static size_t used;
static unsigned seq = 1;

static struct rtattr *put_attr(struct nlmsghdr *n, int type, const void *data, int len) {
    struct rtattr *rta = (struct rtattr *)((char *)n + NLMSG_ALIGN(n->nlmsg_len));
    rta->rta_type = type;
    rta->rta_len = RTA_LENGTH(len);
    if (len) memcpy(RTA_DATA(rta), data, len);
    n->nlmsg_len = NLMSG_ALIGN(n->nlmsg_len) + RTA_ALIGN(rta->rta_len);
    return rta;
}

static struct rtattr *nest_begin(struct nlmsghdr *n, int type) { return put_attr(n, type, NULL, 0); }
static void nest_end(struct nlmsghdr *n, struct rtattr *nest) {
    nest->rta_len = (char *)n + n->nlmsg_len - (char *)nest;
}

static struct nlmsghdr *begin(int type, int flags, const void *hdr, int hdrlen) {
    struct nlmsghdr *n = (struct nlmsghdr *)(buf + used);
    memset(n, 0, NLMSG_SPACE(hdrlen));
    n->nlmsg_len = NLMSG_LENGTH(hdrlen);
    n->nlmsg_type = type;
    n->nlmsg_flags = NLM_F_REQUEST | flags;
    n->nlmsg_seq = seq++;
    memcpy(NLMSG_DATA(n), hdr, hdrlen);
    return n;
}

static void finish(struct nlmsghdr *n) { used += NLMSG_ALIGN(n->nlmsg_len); }

/* Send the buffer (the last message asks for the ACK); count error replies. */
static int flush(int fd, struct nlmsghdr *last) {
    static char rbuf[1 << 20];
    int errors = 0;
    last->nlmsg_flags |= NLM_F_ACK;
    if (send(fd, buf, used, 0) < 0) { perror("send"); exit(1); }
    for (;;) {
        ssize_t len = recv(fd, rbuf, sizeof rbuf, 0);
        if (len < 0) { perror("recv"); exit(1); }
        for (struct nlmsghdr *h = (struct nlmsghdr *)rbuf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type != NLMSG_ERROR) continue;
            struct nlmsgerr *e = NLMSG_DATA(h);
            if (e->error) errors++;
            if (h->nlmsg_seq == last->nlmsg_seq) { used = 0; return errors; }
        }
    }
}

static int open_rtnl(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    int one = 1, size = 4 << 20;
    setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("socket"); exit(1); }
    return fd;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s BRIDGE GROUP NET_OCTET NETNS...\n", argv[0]); return 2; }
    unsigned bridge = atoi(argv[1]), group = atoi(argv[2]), octet = atoi(argv[3]);
    int n = argc - 4, errors = 0;
    int *fds = calloc(n, sizeof *fds);
    for (int i = 0; i < n; i++)
        if ((fds[i] = open(argv[4 + i], O_RDONLY | O_CLOEXEC)) < 0) { perror(argv[4 + i]); return 1; }
    int home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    int host = open_rtnl();
    struct nlmsghdr *last = NULL;
    int in_chunk = 0;
    for (int i = 0; i < n; i++) {
        struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
        struct nlmsghdr *m = begin(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifi, sizeof ifi);
        char name[IFNAMSIZ];
        snprintf(name, sizeof name, "vf%d", i);
        put_attr(m, IFLA_IFNAME, name, strlen(name) + 1);
        put_attr(m, IFLA_MASTER, &bridge, 4);
        put_attr(m, IFLA_GROUP, &group, 4);
        struct rtattr *li = nest_begin(m, IFLA_LINKINFO);
        put_attr(m, IFLA_INFO_KIND, "veth", 5);
        struct rtattr *data = nest_begin(m, IFLA_INFO_DATA);
        struct rtattr *peer = nest_begin(m, VETH_INFO_PEER);
        struct ifinfomsg pifi = {.ifi_family = AF_UNSPEC, .ifi_index = 2};
        memcpy((char *)m + m->nlmsg_len, &pifi, sizeof pifi);
        m->nlmsg_len += sizeof pifi;
        put_attr(m, IFLA_IFNAME, "eth0", 5);
        unsigned nsfd = fds[i];
        put_attr(m, IFLA_NET_NS_FD, &nsfd, 4);
        nest_end(m, peer);
        nest_end(m, data);
        nest_end(m, li);
        finish(m);
        last = m;
        if (++in_chunk == CHUNK_MSGS || used > CHUNK_BYTES - 512) { errors += flush(host, last); in_chunk = 0; }
    }
    if (in_chunk) errors += flush(host, last);

    for (int i = 0; i < n; i++) {
        if (setns(fds[i], CLONE_NEWNET) < 0) { perror("setns"); return 1; }
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
        errors += flush(fd, m);
        close(fd);
    }
    if (setns(home, CLONE_NEWNET) < 0) { perror("setns home"); return 1; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("{\"attach_s\": %.6f, \"errors\": %d}\n",
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, errors);
    return 0;
}
