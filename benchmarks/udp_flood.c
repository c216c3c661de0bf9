/* Small-packet UDP rate between two namespaces, for benchmarks/bench_ebpf.py.
 *
 *   udp_flood recv PORT SECONDS [NAP_US]   count datagrams for SECONDS after the first one;
 *                                       prints {"packets": N, "seconds": S}. With NAP_US > 0,
 *                                       after the first datagram the socket is drained without
 *                                       blocking (recvmmsg, MSG_DONTWAIT), napping NAP_US
 *                                       microseconds whenever it is empty: the receiver then
 *                                       never sleeps on the socket, so the CPU that delivers
 *                                       the datagrams (the sender's, where the whole datapath
 *                                       runs in softirq) pays no cross-CPU wakeup per datagram,
 *                                       and the rate measures the datapath, not the scheduler.
 *   udp_flood send ADDR PORT SECONDS SIZE   send SIZE-byte datagrams as fast as it can
 *                                       (sendmmsg, 64 per call) for SECONDS; prints
 *                                       {"sent": N, "seconds": S, "cpu": C} (C: its CPU time)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int do_recv(int port, double seconds, long nap_us)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	int size = 8 << 20;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
	struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
	static char bufs[BATCH][2048];
	struct iovec iov[BATCH];
	struct mmsghdr msgs[BATCH];
	long packets = 0;
	double start = 0, end;
	struct timespec nap = {.tv_sec = nap_us / 1000000, .tv_nsec = (nap_us % 1000000) * 1000};

	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("bind");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = sizeof(bufs[i]);
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	for (;;) {
		int polling = nap_us > 0 && start != 0;
		int n = recvmmsg(fd, msgs, BATCH, polling ? MSG_DONTWAIT : 0, NULL);
		double t = now();
		if (n > 0) {
			if (start == 0)
				start = t;
			packets += n;
		} else if (start == 0) {
			continue; /* still waiting for the first datagram */
		} else if (polling && errno == EAGAIN) {
			nanosleep(&nap, NULL);
		}
		if (start != 0 && t - start >= seconds)
			break;
	}
	end = now();
	printf("{\"packets\": %ld, \"seconds\": %.6f}\n", packets, end - start);
	return 0;
}

static int do_send(const char *addr, int port, double seconds, int size)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
	static char payload[2048];
	struct iovec iov = {.iov_base = payload, .iov_len = (size_t)size};
	struct mmsghdr msgs[BATCH];
	double start = now();
	long sent = 0;

	inet_pton(AF_INET, addr, &sa.sin_addr);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("connect");
		return 1;
	}
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	/* a little beyond the receiver's window, so it never waits for the sender to start */
	while (now() - start < seconds + 0.5) {
		int n = sendmmsg(fd, msgs, BATCH, 0);
		if (n > 0)
			sent += n;
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	/* cpu: this process's CPU time, which includes the softirq work (the whole data path
	 * of a veth/vxlan chain) the kernel ran in its context */
	printf("{\"sent\": %ld, \"seconds\": %.6f, \"cpu\": %.6f}\n", sent, now() - start,
	       ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
		       ru.ru_stime.tv_usec / 1e6);
	return 0;
}

int main(int argc, char **argv)
{
	if ((argc == 4 || argc == 5) && strcmp(argv[1], "recv") == 0)
		return do_recv(atoi(argv[2]), atof(argv[3]), argc == 5 ? atol(argv[4]) : 0);
	if (argc == 6 && strcmp(argv[1], "send") == 0)
		return do_send(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: udp_flood recv PORT SECONDS [NAP_US] | send ADDR PORT SECONDS SIZE\n");
	return 2;
}
