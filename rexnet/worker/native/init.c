/* rexnet-sandbox-init: PID 1 of a sandboxed job's PID namespace (rexnet.worker.sandboxd).

   Spawned by the root sandbox helper (posix_spawn, in a new PID namespace) with fd 3 a
   socket to the helper, fd 4 the status pipe and as arguments the cgroup.procs files of
   the job's control group. It makes the group (a fresh one: one that exists is refused)
   and joins it (a cgroup v1 mkdir waits for the cgroup lock, which another spare's
   migration holds through an RCU grace period, ~10 ms: here, not in the helper's loop),
   makes the job's mount namespace
   (a fresh tmpfs on /tmp, /var/tmp and /dev/shm, its own /proc), says so (one byte, with
   the namespace, which the helper holds so that its teardown is not the init's: all of it
   ahead of the job), waits for the job (one message, checked by the helper, see
   rexnet.worker.nativeinit), binds the directories the job keeps back into the tmpfs
   (from below it), starts the command (setsid; the terminal as its controlling terminal;
   the job user's groups, gid and uid; its directory), passes signals on to the command's
   group and, once the command has ended, writes its wait status to fd 4. Nothing goes to
   the helper while the command starts (a message would wake it then, on a CPU the job
   needs); the socket closes with the init. Its end ends every process of the namespace
   (the kernel does it). rexnet.worker.sandboxinit does the same where no C compiler was
   found (it sends the namespace once the command is started: it makes it only then).

   `rexnet-sandbox-init --server` (fd 3 a SOCK_SEQPACKET socket that only the root helper
   holds) is the helper's fork server: each request becomes a spare init, a clone of this
   small process as PID 1 of a new PID namespace and a child of the helper (CLONE_PARENT),
   instead of an exec of this program per spare (see serve). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <grp.h>
#include <unistd.h>

#define CONTROL 3
#define STATUS 4
#define MAX_REQUEST (4 << 20)
#define MAX_FDS 64
#define MAX_ITEMS 65536
#define SERVER 3
#define MAX_SERVER_REQUEST 4096  /* nativeinit.SERVER_REQUEST */
#define MAX_PROCS 8  /* cgroup.procs files per spare (one per v1 hierarchy at most) */
#define FIRST_READ 16384  /* bytes of the request read with its descriptors */

static volatile pid_t command = 0;

static void forward(int number) {
    if (command > 0) kill(-command, number);
}

static void fail(const char *what) {
    char line[256];
    int n = snprintf(line, sizeof line, "rexnet-sandbox-init: %s: %s\n", what, strerror(errno));
    if (n > 0) (void)!write(2, line, (size_t)n);
    _exit(1);
}

/* The request: u32 words (ntargets, nargv, nenv, nkeep, ngroups, uid, gid, tty), then the
   targets, the groups, then NUL-terminated strings: cwd, argv, env, then per kept
   directory its private directory's index (one byte, '0' + i) and its path. */
static char *buffer;
static size_t size, at;

static uint32_t word(void) {
    uint32_t v;
    if (size - at < 4) { errno = EPROTO; fail("a short request"); }
    memcpy(&v, buffer + at, 4);
    at += 4;
    return v;
}

static char *string(void) {
    char *s = buffer + at;
    char *end = memchr(s, 0, size - at);
    if (!end) { errno = EPROTO; fail("an unterminated string"); }
    at = (size_t)(end - buffer) + 1;
    return s;
}

static void mkdirs(char *path) {
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(path, 0755) < 0 && errno != EEXIST) fail("mkdir");
        *p = '/';
    }
    if (mkdir(path, 0755) < 0 && errno != EEXIST) fail("mkdir");
}

static const char *private_dirs[] = {"/tmp", "/var/tmp", "/dev/shm"};

/* "joined" to the helper: one byte 'j' carrying NAMESPACE (the job's mount namespace,
   closed here; none if it could not be opened); whether it went. */
static int joined(int namespace) {
    char one = 'j';
    struct iovec out = {&one, 1};
    char space[CMSG_SPACE(sizeof(int))];
    memset(space, 0, sizeof space);
    struct msghdr message = {0};
    message.msg_iov = &out;
    message.msg_iovlen = 1;
    if (namespace >= 0) {
        message.msg_control = space;
        message.msg_controllen = sizeof space;
        struct cmsghdr *c = CMSG_FIRSTHDR(&message);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &namespace, sizeof(int));
    }
    ssize_t sent = sendmsg(CONTROL, &message, MSG_NOSIGNAL);
    if (namespace >= 0) close(namespace);
    return sent == 1;
}

/* The job's control group whose cgroup.procs file is PROCS: made here, fresh (a group of
   that name that exists already is refused: no job joins one that another made or used);
   the jobs' parent group too if it is gone. */
static void make_group(const char *procs) {
    static const char tail[] = "/cgroup.procs";
    size_t length = strlen(procs), cut = sizeof tail - 1;
    char dir[4096];
    if (length <= cut || length >= sizeof dir || strcmp(procs + length - cut, tail) != 0) {
        errno = EINVAL;
        fail(procs);
    }
    memcpy(dir, procs, length - cut);
    dir[length - cut] = 0;
    if (mkdir(dir, 0755) == 0) return;
    if (errno != ENOENT) fail(dir);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) fail(dir);
    *slash = 0;
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) fail(dir);
    *slash = '/';
    if (mkdir(dir, 0755) < 0) fail(dir);
}

static int spare(int nargs, char **args) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  /* the helper's end ends every job */
    prctl(PR_SET_NAME, "rexnet-spare", 0, 0, 0);  /* sandboxd.SPARE_NAME until its job */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);  /* as the helper: exec made it dumpable again */
    signal(SIGCHLD, SIG_DFL);  /* the helper ignores it: the command must stay waitable */
    for (int i = 1; i < nargs; i++) {  /* into the job's control group, made here */
        make_group(args[i]);
        int procs = open(args[i], O_WRONLY | O_CLOEXEC);
        if (procs < 0 || write(procs, "0", 1) != 1) fail(args[i]);
        close(procs);
    }
    /* the job's mount namespace, before the job comes: a fresh tmpfs on each private
       directory, its own /proc; a job's kept directories are bound in once it comes */
    if (unshare(CLONE_NEWNS) < 0) fail("unshare");
    int below[3];  /* what each tmpfs hides, where a job's kept directories are found */
    for (int d = 0; d < 3; d++) {
        struct stat st;
        below[d] = -1;
        if (lstat(private_dirs[d], &st) < 0 || !S_ISDIR(st.st_mode)) continue;
        below[d] = open(private_dirs[d], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (below[d] < 0) fail(private_dirs[d]);
        if (mount("tmpfs", private_dirs[d], "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
            fail(private_dirs[d]);
    }
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        fail("/proc");
    if (!joined(open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC))) _exit(0);
    /* the request: one message from the helper, its descriptors on its first bytes, so
       one read takes its length, the descriptors and (mostly) all of it */
    static char first[FIRST_READ];
    char control[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct iovec iov = {first, sizeof first};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t got = recvmsg(CONTROL, &msg, MSG_CMSG_CLOEXEC);
    if (got <= 0) _exit(0);  /* no job: the spare ends */
    while (got < 4) {  /* (the length cut short: never from the helper, but allowed) */
        ssize_t more = recv(CONTROL, first + got, 4 - (size_t)got, MSG_WAITALL);
        if (more <= 0) _exit(0);
        got += more;
    }
    uint32_t head;
    memcpy(&head, first, 4);
    size = ntohl(head);
    if (size > MAX_REQUEST) { errno = EMSGSIZE; fail("request"); }
    if ((size_t)got - 4 > size) { errno = EPROTO; fail("request"); }  /* more than one */
    buffer = malloc(size + 1);
    if (!buffer) fail("malloc");
    memcpy(buffer, first + 4, (size_t)got - 4);
    size_t have = (size_t)got - 4;
    if (have < size) {
        ssize_t rest = recv(CONTROL, buffer + have, size - have, MSG_WAITALL);
        if (rest != (ssize_t)(size - have)) { errno = EPROTO; fail("request"); }
    }
    int fds[MAX_FDS], nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            nfds = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds, CMSG_DATA(c), (size_t)nfds * sizeof(int));
        }
    }
    uint32_t ntargets = word(), nargv = word(), nenv = word(), nkeep = word(),
             ngroups = word(), uid = word(), gid = word(), tty = word();
    if (ntargets != (uint32_t)nfds || nargv < 1 || nargv > MAX_ITEMS || nenv > MAX_ITEMS
        || nkeep > 8 || ngroups > MAX_ITEMS) {
        errno = EPROTO;
        fail("request");
    }
    int targets[MAX_FDS];
    for (uint32_t i = 0; i < ntargets; i++) {
        targets[i] = (int)word();
        if (targets[i] < 0 || targets[i] >= 1024) { errno = EPROTO; fail("request"); }
    }
    gid_t *groups = calloc(ngroups + 1, sizeof(gid_t));
    char **argv = calloc(nargv + 1, sizeof(char *));
    char **env = calloc(nenv + 1, sizeof(char *));
    if (!groups || !argv || !env) fail("calloc");
    for (uint32_t i = 0; i < ngroups; i++) groups[i] = (gid_t)word();
    char *cwd = string();
    for (uint32_t i = 0; i < nargv; i++) argv[i] = string();
    for (uint32_t i = 0; i < nenv; i++) env[i] = string();

    prctl(PR_SET_NAME, "rexnet-init", 0, 0, 0);
    for (uint32_t i = 0; i < nkeep; i++) {  /* bound back from below its tmpfs */
        char *index = string(), *keep = string();
        int d = index[0] - '0';
        size_t length = d >= 0 && d <= 2 ? strlen(private_dirs[d]) : 0;
        if (!length || below[d] < 0 || strncmp(keep, private_dirs[d], length) != 0
            || keep[length] != '/' || !keep[length + 1]) {
            errno = EPROTO;
            fail("request");
        }
        int handle = openat(below[d], keep + length + 1, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (handle < 0) fail(keep);
        char source[64];
        snprintf(source, sizeof source, "/proc/self/fd/%d", handle);
        mkdirs(keep);
        if (mount(source, keep, NULL, MS_BIND | MS_REC, NULL) < 0) fail(keep);
        close(handle);
    }
    for (int d = 0; d < 3; d++)
        if (below[d] >= 0) close(below[d]);

    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    struct sigaction passes = {0};
    passes.sa_handler = forward;
    sigfillset(&passes.sa_mask);
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP && s != SIGCHLD) sigaction(s, &passes, NULL);
    /* vfork: no copy of this process's page tables for a child that only sets itself up
       and execs (this process waits until then; signals stay blocked here meanwhile) */
    pid_t child = vfork();
    if (child < 0) fail("vfork");
    if (child == 0) {
        struct sigaction plain = {0};
        plain.sa_handler = SIG_DFL;
        for (int s = 1; s < NSIG; s++)
            if (s != SIGKILL && s != SIGSTOP) sigaction(s, &plain, NULL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        prctl(PR_SET_NAME, "rexnet-exec", 0, 0, 0);
        int high[MAX_FDS];
        if (setsid() < 0) goto failed;
        for (uint32_t i = 0; i < ntargets; i++)
            if ((high[i] = fcntl(fds[i], F_DUPFD, 1024)) < 0) goto failed;
        for (uint32_t i = 0; i < ntargets; i++)
            if (dup2(high[i], targets[i]) < 0) goto failed;
        int from = 0;  /* close every descriptor but the targets */
        for (int fd = 0; fd <= 1024; fd++) {
            int kept = 0;
            for (uint32_t i = 0; i < ntargets; i++) kept |= targets[i] == fd;
            if (kept || fd == 1024) {
                if (fd > from) syscall(SYS_close_range, (unsigned)from, (unsigned)fd - 1, 0);
                from = fd + 1;
            }
        }
        syscall(SYS_close_range, 1024U, ~0U, 0);
        if (tty && ioctl(0, TIOCSCTTY, 1) < 0) goto failed;
        /* the worker's bound on descriptors, not the helper's (after the moves above) */
        const char *nofile = getenv("REXNET_NOFILE");
        struct rlimit files;
        if (nofile && *nofile && getrlimit(RLIMIT_NOFILE, &files) == 0) {
            files.rlim_cur = (rlim_t)strtoull(nofile, NULL, 10);
            if (files.rlim_cur > files.rlim_max) files.rlim_cur = files.rlim_max;
            if (setrlimit(RLIMIT_NOFILE, &files) < 0) goto failed;
        }
        if (setgroups(ngroups, groups) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
            goto failed;
        if (chdir(cwd) < 0) goto failed;
        execvpe(argv[0], argv, env);
    failed:;
        char line[512];
        int n = snprintf(line, sizeof line, "rexnet: cannot start the job: %s: %s\n",
                         argv[0], strerror(errno));
        if (n > 0) (void)!write(2, line, (size_t)n > sizeof line ? sizeof line : (size_t)n);
        _exit(127);
    }
    command = child;
    for (int i = 0; i < nfds; i++) close(fds[i]);
    sigprocmask(SIG_SETMASK, &old, NULL);
    int status = 0;
    for (;;) {
        pid_t pid = waitpid(-1, &status, 0);
        if (pid == child) break;
        if (pid < 0 && errno != EINTR) { status = 0; break; }
    }
    char text[16];
    int n = snprintf(text, sizeof text, "%d", status);
    (void)!write(STATUS, text, (size_t)n);
    _exit(0);
}

/* A spare from the fork server: its control socket and status pipe to fds 3 and 4 (FDS:
   copies of the received ones, above 10), nothing else of the server's. */
static int cloned(int server, int fds[2], uint32_t nofile, int nprocs, char **procs) {
    close(server);
    if (dup2(fds[0], CONTROL) < 0 || dup2(fds[1], STATUS) < 0) fail("dup2");
    close(fds[0]);
    close(fds[1]);
    if (nofile) {
        char text[16];
        snprintf(text, sizeof text, "%u", nofile);
        setenv("REXNET_NOFILE", text, 1);
    }
    char *args[MAX_PROCS + 2];
    args[0] = "rexnet-sandbox-init";
    for (int i = 0; i < nprocs; i++) args[i + 1] = procs[i];
    args[nprocs + 1] = NULL;
    return spare(nprocs + 1, args);
}

/* The fork server. A request is one message of at most MAX_SERVER_REQUEST bytes - u32 the
   command's soft bound on descriptors (0: the helper's), then NUL-terminated paths of the
   cgroup.procs files to join (MAX_PROCS at most) - with exactly two descriptors (the
   spare's control socket, its status pipe). Anything else is refused whole (a message cut
   short by the bound, descriptors missing, too many or cut off, a malformed body): its
   descriptors are closed and the reply is -EPROTO. The reply (i32) is the spare's pid, or
   -errno if the clone failed. The server ends when the helper closes the socket, or dies. */
static int serve(void) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    prctl(PR_SET_NAME, "rexnet-initsrv", 0, 0, 0);  /* nativeinit.SERVER_NAME */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    int server = fcntl(SERVER, F_DUPFD_CLOEXEC, 10);
    if (server < 0) fail("server socket");
    close(SERVER);
    for (;;) {
        char buffer[MAX_SERVER_REQUEST];
        char space[CMSG_SPACE(4 * sizeof(int))];
        struct iovec iov = {buffer, sizeof buffer};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space;
        msg.msg_controllen = sizeof space;
        ssize_t got = recvmsg(server, &msg, MSG_CMSG_CLOEXEC);
        if (got == 0) _exit(0);  /* the helper let us go */
        if (got < 0) {
            if (errno == EINTR) continue;
            fail("server");
        }
        int fds[4], nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (nfds < 4) fds[nfds++] = fd; else close(fd);
            }
        }
        int32_t reply = -EPROTO;
        uint32_t nofile = 0;
        char *procs[MAX_PROCS];
        int nprocs = 0, ok = !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) && nfds == 2
            && got >= 4 && (got == 4 || buffer[got - 1] == 0);
        if (ok) {
            memcpy(&nofile, buffer, 4);
            for (ssize_t at = 4; ok && at < got; at += (ssize_t)strlen(buffer + at) + 1) {
                if (nprocs == MAX_PROCS || buffer[at] != '/') ok = 0;
                else procs[nprocs++] = buffer + at;
            }
        }
        if (ok) {
            int moved[2] = {fcntl(fds[0], F_DUPFD_CLOEXEC, 10), fcntl(fds[1], F_DUPFD_CLOEXEC, 10)};
            pid_t pid = moved[0] < 0 || moved[1] < 0 ? -1 : (pid_t)syscall(
                SYS_clone, CLONE_PARENT | CLONE_NEWPID | SIGCHLD, NULL, NULL, NULL, NULL);
            if (pid == 0) {
                for (int i = 0; i < nfds; i++) close(fds[i]);
                _exit(cloned(server, moved, nofile, nprocs, procs));
            }
            reply = pid > 0 ? pid : -errno;
            for (int i = 0; i < 2; i++)
                if (moved[i] >= 0) close(moved[i]);
        }
        for (int i = 0; i < nfds; i++) close(fds[i]);
        if (send(server, &reply, sizeof reply, MSG_NOSIGNAL) != sizeof reply) _exit(0);
    }
}

int main(int nargs, char **args) {
    if (nargs == 2 && strcmp(args[1], "--server") == 0) return serve();
    return spare(nargs, args);
}
