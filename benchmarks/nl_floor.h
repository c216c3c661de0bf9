/*
 * Raw rtnetlink helpers shared by the C floors of the benchmarks (attach_floor.c,
 * peer_floor.c): one send buffer of at most CHUNK_BYTES, messages built in place, an ACK
 * asked only on a batch's last message, and the error replies counted.
 */
#ifndef CNM_NL_FLOOR_H
#define CNM_NL_FLOOR_H

#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

static inline struct rtattr *nest_begin(struct nlmsghdr *n, int type) { return put_attr(n, type, NULL, 0); }
static inline void nest_end(struct nlmsghdr *n, struct rtattr *nest) {
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

#endif
