/* Steps the wall clock of a process, as NTP does on a Raspberry Pi that booted without a
 * real-time clock, and leaves the monotonic clock alone (tests/harness/clockstep.py).
 *
 * LD_PRELOAD it with CLOCKSTEP_FILE naming a file that holds an offset in seconds ("0",
 * "3600", "-7200"): CLOCK_REALTIME (clock_gettime, gettimeofday, time) reads the real
 * time plus the offset, re-read from the file at most every 20 ms of monotonic time.
 *
 * Why not libfaketime (Debian's faketime 0.9.10): with FAKETIME_DONT_FAKE_MONOTONIC=1 its
 * clock_nanosleep wrapper still shifts absolute CLOCK_MONOTONIC deadlines by the fake
 * offset, so Python's time.sleep() fails with EINVAL at once; without that variable the
 * monotonic clock jumps too, which no NTP step does.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static volatile double offset_s;
static volatile long long read_at_ns = -1000000000LL;

static clock_gettime_fn real(void) {
    if (!real_clock_gettime) {
        real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    }
    return real_clock_gettime;
}

static void reload(void) {
    struct timespec now;
    if (real()(CLOCK_MONOTONIC, &now) != 0) return;
    long long ns = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    if (ns - read_at_ns < 20000000LL) return;
    read_at_ns = ns;
    const char *path = getenv("CLOCKSTEP_FILE");
    if (!path) return;
    FILE *f = fopen(path, "re");
    if (!f) return;
    double value;
    if (fscanf(f, "%lf", &value) == 1) offset_s = value;
    fclose(f);
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int rc = real()(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        reload();
        long long whole = (long long)offset_s;
        long long nanos = (long long)((offset_s - (double)whole) * 1e9) + ts->tv_nsec;
        ts->tv_sec += whole + nanos / 1000000000LL;
        nanos %= 1000000000LL;
        if (nanos < 0) {
            nanos += 1000000000LL;
            ts->tv_sec -= 1;
        }
        ts->tv_nsec = nanos;
    }
    return rc;
}

#pragma GCC diagnostic ignored "-Wnonnull-compare" /* glibc marks tv nonnull; POSIX not */
int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    if (tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
