/* The C floors of one sample cycle: replay, as cheaply as C can, the file system calls that one
 * cycle of the exporter made (recorded with strace by tests/bench/inner.py).
 *
 * Usage: floor OPS-FILE [REPEAT [MODE]]
 * Input: one operation a line, "<op> <path>":
 *   F  a file read whole; a path that does not exist costs its failed open, as it does for the
 *      exporter
 *   D  a directory listed (a scandir/listdir)
 *   S  stat() the path
 * MODE "open" (the default): every F is open, read once into a 64 KiB buffer (again only while a
 *   read fills it), close; every D is open, getdents64 until it returns 0, close.
 * MODE "kept": every F and D is opened once before the timed repeats (as a descriptor cache kept
 *   across cycles would hold them) and each repeat reads it from offset 0: pread(fd, 0) for a
 *   file (seq_file-backed cgroup and /proc files regenerate their content), lseek(0) and
 *   getdents64 for a directory. The limit is the read alone.
 *   Kept are as many as RLIMIT_NOFILE allows (raised to its hard limit, less 64 for the opens
 *   of the rest); the rest are opened, read and closed each repeat, as the exporter's cap does.
 * S is a stat() by path in both modes.
 * Output: one JSON line: ops, mode, repeat, per-repeat CPU (CLOCK_PROCESS_CPUTIME_ID) and wall
 * seconds of the replay alone (the list is parsed and, in kept mode, opened before timing
 * starts), failed opens, and in kept mode the unreclaimable slab the kept descriptors added
 * (kernel memory: a read seq_file keeps its buffer, a page, until close).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536

static char buf[CHUNK];

static double now(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long meminfo_kib(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long value = -1;
    size_t len = strlen(key);
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, key, len) == 0 && line[len] == ':') {
            value = atol(line + len + 1);
            break;
        }
    }
    if (f) fclose(f);
    return value;
}

static void read_kept(int fd) {
    off_t at = 0;
    ssize_t got;
    while ((got = pread(fd, buf, CHUNK, at)) == CHUNK) at += got;
}

int main(int argc, char **argv) {
    FILE *in = argc > 1 ? fopen(argv[1], "r") : stdin;
    int repeat = argc > 2 ? atoi(argv[2]) : 5;
    int kept = argc > 3 && strcmp(argv[3], "kept") == 0;
    if (!in) { perror("input"); return 2; }
    size_t cap = 1 << 14, n = 0;
    char *ops = malloc(cap);
    char **paths = malloc(cap * sizeof *paths);
    char *line = NULL;
    size_t len = 0;
    ssize_t got;
    while ((got = getline(&line, &len, in)) > 0) {
        if (got < 3 || line[1] != ' ') continue;
        if (line[got - 1] == '\n') line[got - 1] = 0;
        if (n == cap) {
            cap *= 2;
            ops = realloc(ops, cap);
            paths = realloc(paths, cap * sizeof *paths);
        }
        ops[n] = line[0];
        paths[n++] = strdup(line + 2);
    }
    struct stat st;
    long failed = 0, slab_added = 0, kept_count = 0;
    int *fds = calloc(n ? n : 1, sizeof *fds);
    if (kept) {
        struct rlimit limit;
        getrlimit(RLIMIT_NOFILE, &limit);
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
        long slab_before = meminfo_kib("SUnreclaim");
        for (size_t i = 0; i < n; i++) {
            fds[i] = -1;
            if (ops[i] == 'S' || kept_count + 64 >= (long)limit.rlim_cur) continue;
            fds[i] = open(paths[i], O_RDONLY | O_CLOEXEC | (ops[i] == 'D' ? O_DIRECTORY : 0));
            if (fds[i] >= 0) kept_count++;
            if (fds[i] >= 0 && ops[i] == 'F') read_kept(fds[i]);  /* the first read allocates the buffer */
        }
        slab_added = meminfo_kib("SUnreclaim") - slab_before;
    }
    double *cpu = calloc(repeat, sizeof *cpu), *wall = calloc(repeat, sizeof *wall);
    for (int r = 0; r < repeat; r++) {
        double c0 = now(CLOCK_PROCESS_CPUTIME_ID), w0 = now(CLOCK_MONOTONIC);
        for (size_t i = 0; i < n; i++) {
            if (ops[i] == 'S') {
                failed += stat(paths[i], &st) != 0;
                continue;
            }
            int fd = kept ? fds[i] : -1;
            if (fd < 0) fd = open(paths[i], O_RDONLY | O_CLOEXEC | (ops[i] == 'D' ? O_DIRECTORY : 0));
            if (fd < 0) {  /* kept mode too: a cache holds nothing for a missing file and tries its path again */
                failed++;
                continue;
            }
            if (ops[i] == 'D') {
                if (kept) lseek(fd, 0, SEEK_SET);
                while (syscall(SYS_getdents64, fd, buf, sizeof buf) > 0) {}
            } else if (kept) {
                read_kept(fd);
            } else {
                while (read(fd, buf, CHUNK) == CHUNK) {}
            }
            if (fd != (kept ? fds[i] : -1)) close(fd);
        }
        cpu[r] = now(CLOCK_PROCESS_CPUTIME_ID) - c0;
        wall[r] = now(CLOCK_MONOTONIC) - w0;
    }
    printf("{\"ops\": %zu, \"mode\": \"%s\", \"repeat\": %d, \"cpu_seconds\": [", n, kept ? "kept" : "open", repeat);
    for (int r = 0; r < repeat; r++) printf("%s%.6f", r ? ", " : "", cpu[r]);
    printf("], \"wall_seconds\": [");
    for (int r = 0; r < repeat; r++) printf("%s%.6f", r ? ", " : "", wall[r]);
    printf("], \"failed\": %ld, \"slab_added_kib\": %ld, \"kept\": %ld}\n", failed / (repeat ? repeat : 1), slab_added,
           kept_count);
    return 0;
}
