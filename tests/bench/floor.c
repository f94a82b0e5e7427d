/* The C floor of one sample cycle: replay, as cheaply as C can, the file system calls that one
 * cycle of the exporter made (recorded with strace by tests/bench/inner.py).
 *
 * Input (stdin or argv[1]): one operation a line, "<op> <path>":
 *   F  open, read once into a 64 KiB buffer (again only while a read fills it), close; a path
 *      that does not exist costs its failed open, as it does for the exporter
 *   D  open the directory, getdents64 until it returns 0, close (a scandir/listdir)
 *   S  stat() the path
 * Output: one JSON line: ops, repeat, and per-repeat CPU (CLOCK_PROCESS_CPUTIME_ID) and wall
 * seconds of the replay alone (the list is parsed before timing starts).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536

static double now(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    FILE *in = argc > 1 ? fopen(argv[1], "r") : stdin;
    int repeat = argc > 2 ? atoi(argv[2]) : 5;
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
    static char buf[CHUNK];
    struct stat st;
    long failed = 0;
    printf("{\"ops\": %zu, \"repeat\": %d, \"cpu_seconds\": [", n, repeat);
    double *cpu = calloc(repeat, sizeof *cpu), *wall = calloc(repeat, sizeof *wall);
    for (int r = 0; r < repeat; r++) {
        double c0 = now(CLOCK_PROCESS_CPUTIME_ID), w0 = now(CLOCK_MONOTONIC);
        for (size_t i = 0; i < n; i++) {
            if (ops[i] == 'S') {
                failed += stat(paths[i], &st) != 0;
                continue;
            }
            int fd = open(paths[i], O_RDONLY | O_CLOEXEC | (ops[i] == 'D' ? O_DIRECTORY : 0));
            if (fd < 0) { failed++; continue; }
            if (ops[i] == 'D') {
                while (syscall(SYS_getdents64, fd, buf, sizeof buf) > 0) {}
            } else {
                while (read(fd, buf, CHUNK) == CHUNK) {}
            }
            close(fd);
        }
        cpu[r] = now(CLOCK_PROCESS_CPUTIME_ID) - c0;
        wall[r] = now(CLOCK_MONOTONIC) - w0;
    }
    for (int r = 0; r < repeat; r++) printf("%s%.6f", r ? ", " : "", cpu[r]);
    printf("], \"wall_seconds\": [");
    for (int r = 0; r < repeat; r++) printf("%s%.6f", r ? ", " : "", wall[r]);
    printf("], \"failed\": %ld}\n", failed / (repeat ? repeat : 1));
    return 0;
}
