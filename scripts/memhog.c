/*
 * memhog: the benchmark workload. Holds N MiB of random memory, counts, and
 * tells a checksum of that memory on request, so a test can check that a
 * migration lost neither memory nor time.
 *
 *   memhog MIB [COUNTER_FILE|- [CHECKSUM_FILE|-]]
 *
 * - Every 10 ms it prints the next counter value (0, 1, 2, ...) on stdout
 *   and, with COUNTER_FILE, appends it there. The file is opened for each
 *   value and closed again: CRIU checks the size of every file a task holds
 *   open, and a file held across the move would have to match exactly.
 * - On SIGUSR1 it computes a 64-bit FNV-1a checksum of its memory and
 *   prints "checksum HEX" on stdout and, with CHECKSUM_FILE, writes
 *   "HEX\n" there (through a temporary file and a rename, so a reader never
 *   sees half of it).
 * - The memory is filled once from getrandom(), so it is incompressible and
 *   has no zero pages that CRIU could skip, then only ever read.
 *
 * Built static (gcc -static -O2) by scripts/setup-system.sh, so the same
 * binary runs on the hosts and in an image built from the lab's busybox.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t want_checksum;

static void on_usr1(int sig)
{
	(void)sig;
	want_checksum = 1;
}

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return; /* a closed stdout must not stop the count */
		}
		buf += n;
		len -= (size_t)n;
	}
}

static uint64_t fnv1a(const uint64_t *words, size_t count)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < count; i++) {
		h ^= words[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static void fill_random(uint64_t *words, size_t count)
{
	/* getrandom() for a seed, xorshift64* for the bulk: getrandom alone is
	 * slow for a GiB. */
	uint64_t x;
	while (getrandom(&x, sizeof(x), 0) != sizeof(x))
		;
	x |= 1;
	for (size_t i = 0; i < count; i++) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		words[i] = x * 0x2545f4914f6cdd1dULL;
	}
}

static void write_checksum(const char *path, uint64_t sum)
{
	char line[64];
	int len = snprintf(line, sizeof(line), "checksum %016" PRIx64 "\n", sum);
	write_all(1, line, (size_t)len);
	if (!path)
		return;
	char tmp[4096];
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return;
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	write_all(fd, line + strlen("checksum "), (size_t)len - strlen("checksum "));
	close(fd);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 4) {
		fprintf(stderr, "usage: %s MIB [COUNTER_FILE|- [CHECKSUM_FILE|-]]\n", argv[0]);
		return 2;
	}
	char *end;
	errno = 0;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (errno || *end || end == argv[1] || mib > (1UL << 20)) {
		fprintf(stderr, "memhog: MIB must be a whole number of MiB, got '%s'\n", argv[1]);
		return 2;
	}
	const char *counter_path = argc > 2 && strcmp(argv[2], "-") ? argv[2] : NULL;
	const char *checksum_path = argc > 3 && strcmp(argv[3], "-") ? argv[3] : NULL;

	/* Before the fill: SIGUSR1's default action would end the process. */
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	size_t count = mib * 1024 * 1024 / sizeof(uint64_t);
	uint64_t *words = NULL;
	if (count) {
		words = malloc(count * sizeof(uint64_t));
		if (!words) {
			fprintf(stderr, "memhog: cannot allocate %lu MiB\n", mib);
			return 1;
		}
		fill_random(words, count);
	}

	struct timespec tick = { 0, 10 * 1000 * 1000 };
	for (uint64_t i = 0;; i++) {
		char line[32];
		int len = snprintf(line, sizeof(line), "%" PRIu64 "\n", i);
		write_all(1, line, (size_t)len);
		if (counter_path) {
			int fd = open(counter_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
			if (fd >= 0) {
				write_all(fd, line, (size_t)len);
				close(fd);
			}
		}
		if (want_checksum) {
			want_checksum = 0;
			write_checksum(checksum_path, fnv1a(words, count));
		}
		nanosleep(&tick, NULL);
	}
}
