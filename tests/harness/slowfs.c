/*
 * slowfs: a FUSE filesystem that mirrors a directory and makes every fsync (and
 * fdatasync) take SLOWFS_FSYNC_MS milliseconds, as a worn SD card's flush can. Everything
 * else passes straight through, so only the cost of durability changes.
 *
 * Used by edge-agent's chaos tests (bench/slowfs.py builds it with the system's libfuse3):
 *     slowfs BACKING_DIR MOUNTPOINT -f -o allow_other
 *
 * Built on libfuse3's high-level API; one file handle per open, kept in fi->fh.
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static char backing[PATH_MAX];
static long fsync_ms = 1000;
static long fsyncs = 0;

static void full(char *out, const char *path) {
    snprintf(out, PATH_MAX, "%s%s", backing, path);
}

static int fs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    if (fi != NULL && fstat((int)fi->fh, st) == 0) return 0;
    char p[PATH_MAX];
    full(p, path);
    return lstat(p, st) == -1 ? -errno : 0;
}

static int fs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    (void)off; (void)fi; (void)flags;
    char p[PATH_MAX];
    full(p, path);
    DIR *dir = opendir(p);
    if (dir == NULL) return -errno;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        struct stat st = {0};
        st.st_ino = entry->d_ino;
        st.st_mode = (mode_t)entry->d_type << 12;
        if (fill(buf, entry->d_name, &st, 0, 0)) break;
    }
    closedir(dir);
    return 0;
}

static int fs_mkdir(const char *path, mode_t mode) {
    char p[PATH_MAX];
    full(p, path);
    return mkdir(p, mode) == -1 ? -errno : 0;
}

static int fs_unlink(const char *path) {
    char p[PATH_MAX];
    full(p, path);
    return unlink(p) == -1 ? -errno : 0;
}

static int fs_rmdir(const char *path) {
    char p[PATH_MAX];
    full(p, path);
    return rmdir(p) == -1 ? -errno : 0;
}

static int fs_rename(const char *from, const char *to, unsigned int flags) {
    if (flags) return -EINVAL;
    char a[PATH_MAX], b[PATH_MAX];
    full(a, from);
    full(b, to);
    return rename(a, b) == -1 ? -errno : 0;
}

static int fs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) {
    if (fi != NULL) return fchmod((int)fi->fh, mode) == -1 ? -errno : 0;
    char p[PATH_MAX];
    full(p, path);
    return chmod(p, mode) == -1 ? -errno : 0;
}

static int fs_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi) {
    if (fi != NULL) return fchown((int)fi->fh, uid, gid) == -1 ? -errno : 0;
    char p[PATH_MAX];
    full(p, path);
    return lchown(p, uid, gid) == -1 ? -errno : 0;
}

static int fs_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    if (fi != NULL) return ftruncate((int)fi->fh, size) == -1 ? -errno : 0;
    char p[PATH_MAX];
    full(p, path);
    return truncate(p, size) == -1 ? -errno : 0;
}

static int fs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi) {
    if (fi != NULL) return futimens((int)fi->fh, tv) == -1 ? -errno : 0;
    char p[PATH_MAX];
    full(p, path);
    return utimensat(AT_FDCWD, p, tv, AT_SYMLINK_NOFOLLOW) == -1 ? -errno : 0;
}

static int fs_open(const char *path, struct fuse_file_info *fi) {
    char p[PATH_MAX];
    full(p, path);
    int fd = open(p, fi->flags);
    if (fd == -1) return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

static int fs_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
    char p[PATH_MAX];
    full(p, path);
    int fd = open(p, fi->flags, mode);
    if (fd == -1) return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

static int fs_read(const char *path, char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi) {
    (void)path;
    ssize_t n = pread((int)fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fs_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    (void)path;
    ssize_t n = pwrite((int)fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fs_statfs(const char *path, struct statvfs *st) {
    char p[PATH_MAX];
    full(p, path);
    return statvfs(p, st) == -1 ? -errno : 0;
}

static int fs_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    close((int)fi->fh);
    return 0;
}

/* The point of it all: a flush to stable storage that takes its time. */
static int fs_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
    (void)path;
    struct timespec pause = {fsync_ms / 1000, (fsync_ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
    int rc = datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh);
    __atomic_add_fetch(&fsyncs, 1, __ATOMIC_RELAXED);
    return rc == -1 ? -errno : 0;
}

static int fs_fallocate(const char *path, int mode, off_t off, off_t len,
                        struct fuse_file_info *fi) {
    (void)path;
    if (mode) return -EOPNOTSUPP;
    return -posix_fallocate((int)fi->fh, off, len);
}

static void *fs_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    (void)conn;
    cfg->use_ino = 1;
    /* No kernel caching of attributes: the agent's files change under it. */
    cfg->attr_timeout = 0;
    cfg->entry_timeout = 0;
    cfg->negative_timeout = 0;
    return NULL;
}

static const struct fuse_operations ops = {
    .init = fs_init,
    .getattr = fs_getattr,
    .readdir = fs_readdir,
    .mkdir = fs_mkdir,
    .unlink = fs_unlink,
    .rmdir = fs_rmdir,
    .rename = fs_rename,
    .chmod = fs_chmod,
    .chown = fs_chown,
    .truncate = fs_truncate,
    .utimens = fs_utimens,
    .open = fs_open,
    .create = fs_create,
    .read = fs_read,
    .write = fs_write,
    .statfs = fs_statfs,
    .release = fs_release,
    .fsync = fs_fsync,
    .fallocate = fs_fallocate,
};

int main(int argc, char *argv[]) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BACKING_DIR MOUNTPOINT [fuse options]\n", argv[0]);
        return 2;
    }
    if (realpath(argv[1], backing) == NULL) {
        perror(argv[1]);
        return 2;
    }
    const char *ms = getenv("SLOWFS_FSYNC_MS");
    if (ms != NULL) fsync_ms = strtol(ms, NULL, 10);
    /* fuse_main gets argv without the backing directory. */
    argv[1] = argv[0];
    return fuse_main(argc - 1, argv + 1, &ops, NULL);
}
