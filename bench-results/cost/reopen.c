/* What reopening a file through /proc/self/fd costs against opening it by name (issue 16
 * item 4): cc -O2 -o reopen reopen.c && ./reopen DIR  (DIR on the file system to measure). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define N 200000

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

#define TIME(label, expr)                                                   \
	do {                                                                \
		double t0 = now_us();                                       \
		for (int i = 0; i < N; i++) {                               \
			int fd = (expr);                                    \
			if (fd < 0) {                                       \
				perror(label);                              \
				return 1;                                   \
			}                                                   \
			close(fd);                                          \
		}                                                           \
		printf("%-42s %.2f us\n", label, (now_us() - t0) / N);      \
	} while (0)

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: reopen DIR\n");
		return 2;
	}
	int dir = open(argv[1], O_RDONLY | O_DIRECTORY);
	int f = openat(dir, "reopen-test", O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
	if (dir < 0 || f < 0 || write(f, "x", 1) != 1)
		return perror("setup"), 1;
	close(f);
	int path = openat(dir, "reopen-test", O_PATH | O_CLOEXEC);
	int proc = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
	char name[16];
	snprintf(name, sizeof name, "%d", path);
	for (int round = 1; round <= 2; round++) {
		printf("round %d\n", round);
		TIME("openat(dir, name, O_RDONLY) + close", openat(dir, "reopen-test", O_RDONLY | O_CLOEXEC));
		TIME("openat(/proc/self/fd, N, O_RDONLY) + close", openat(proc, name, O_RDONLY | O_CLOEXEC));
		TIME("openat(dir, name, O_PATH) + close", openat(dir, "reopen-test", O_PATH | O_CLOEXEC));
		TIME("openat(/proc/self/fd, N, O_PATH) + close", openat(proc, name, O_PATH | O_CLOEXEC));
		TIME("open_tree(fd, \"\", AT_EMPTY_PATH) + close",
		     (int)syscall(SYS_open_tree, path, "", AT_EMPTY_PATH | O_CLOEXEC));
		TIME("dup + close (the floor)", dup(path));
	}
	unlinkat(dir, "reopen-test", 0);
	return 0;
}
