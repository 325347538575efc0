/* rexnet's native launcher: an ordinary `rexnet exec` (or `cexec`) through the agent,
 * without starting a Python interpreter.
 *
 * It reads exec's command line as rexnet.cli.launcher.parse does, builds the same Exec
 * message (rexnet.protocol.agentwire: u32 length, JSON object) and hands it with
 * descriptors 0, 1, 2 and any --fd to the agent (SCM_RIGHTS), relays signals and exits
 * with the job's status. Before it sends anything it checks, as the Python launcher does,
 * that the socket's directory is a real directory of this uid with mode 0700 (lstat) and
 * that the agent runs as this uid (SO_PEERCRED). Descriptors 0, 1 and 2 that are closed
 * are opened on /dev/null first (as ssh does).
 *
 * Everything else goes to the Python launcher (REXNET_PY / CEXEC_PY, exec'd with the
 * same arguments), which does all of it and says what is wrong: other subcommands and
 * options, a command line it does not follow, an application name (the configuration),
 * a terminal (-t, or stdin a terminal without -T), no agent running yet (it starts one),
 * a socket that fails the checks (it refuses with a message and runs standalone),
 * a request it could not send, and any argument that is not UTF-8.
 *
 * Built by `python -m rexnet.cli.entry` (make install) where a C compiler exists.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef REXNET_PY
#define REXNET_PY "rexnet-py"
#endif
#ifndef CEXEC_PY
#define CEXEC_PY "cexec-py"
#endif

#define MAX_MESSAGE (1u << 20)
#define MAX_ARGS 4096
#define MAX_ARG 65536
#define MAX_TARGETS 64
#define MAX_TARGET 300
#define MAX_ENV 256
#define MAX_NAME 256
#define MAX_FDS 64
#define MAX_DEPTH 8

static char **original_argv;
static int cexec_mode;

/* Hand the whole command line to the Python launcher. */
static void fallback(void) {
    const char *python = cexec_mode ? CEXEC_PY : REXNET_PY;
    original_argv[0] = (char *)python;
    execv(python, original_argv);
    dprintf(2, "rexnet: cannot run %s: %s\n", python, strerror(errno));
    _exit(255);
}

static void standard_descriptors(void) {
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
            continue;
        int null = open("/dev/null", O_RDWR);
        if (null < 0)
            _exit(255);
        if (null != fd) {
            dup2(null, fd);
            close(null);
        }
    }
}

/* -- a growing byte buffer ---------------------------------------------------------- */

struct buf {
    char *p;
    size_t n, cap;
};

static void put(struct buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            fallback();
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* N if the N bytes at S are UTF-8 that Python reads as the same characters (strict: no
 * overlong forms, surrogates or code points past U+10FFFF), else -1. */
static long utf8_check(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = u[i], cp, min;
        size_t more;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xE0) == 0xC0) { more = 1; cp = c & 0x1F; min = 0x80; }
        else if ((c & 0xF0) == 0xE0) { more = 2; cp = c & 0x0F; min = 0x800; }
        else if ((c & 0xF8) == 0xF0) { more = 3; cp = c & 0x07; min = 0x10000; }
        else return -1;
        if (i + more >= n)
            return -1;
        for (size_t k = 1; k <= more; k++) {
            if ((u[i + k] & 0xC0) != 0x80)
                return -1;
            cp = (cp << 6) | (u[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return -1;
        i += more + 1;
    }
    return (long)n;
}

static long utf8_length(const char *s) { return utf8_check(s, strlen(s)); }

/* S as a JSON string; falls back to Python for text that is not UTF-8. */
static void json_string(struct buf *b, const char *s) {
    if (utf8_length(s) < 0)
        fallback();
    put(b, "\"", 1);
    for (const unsigned char *u = (const unsigned char *)s; *u; u++) {
        char esc[8];
        switch (*u) {
        case '"': puts_(b, "\\\""); break;
        case '\\': puts_(b, "\\\\"); break;
        case '\n': puts_(b, "\\n"); break;
        case '\r': puts_(b, "\\r"); break;
        case '\t': puts_(b, "\\t"); break;
        case '\b': puts_(b, "\\b"); break;
        case '\f': puts_(b, "\\f"); break;
        default:
            if (*u < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *u);
                puts_(b, esc);
            } else {
                put(b, (const char *)u, 1);
            }
        }
    }
    put(b, "\"", 1);
}

static void json_strings(struct buf *b, char **items, int n) {
    put(b, "[", 1);
    for (int i = 0; i < n; i++) {
        if (i)
            put(b, ",", 1);
        json_string(b, items[i]);
    }
    put(b, "]", 1);
}

/* -- paths, as os.path does them ---------------------------------------------------- */

/* os.path.abspath(PATH): PATH joined to the working directory, normalised. */
static char *abspath(const char *path) {
    struct buf joined = {0}, out = {0};
    if (path[0] != '/') {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd))
            fallback();
        puts_(&joined, cwd);
        puts_(&joined, "/");
    }
    puts_(&joined, path);
    const char *p = joined.p;
    int slashes = 0;
    while (p[slashes] == '/')
        slashes++;
    puts_(&out, slashes == 2 ? "//" : "/"); /* POSIX keeps exactly two leading slashes */
    size_t root = out.n;
    while (*p) {
        while (*p == '/')
            p++;
        const char *end = strchr(p, '/');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == 0 || (len == 1 && p[0] == '.')) {
        } else if (len == 2 && p[0] == '.' && p[1] == '.') {
            if (out.n > root) {
                while (out.n > root && out.p[out.n - 1] != '/')
                    out.n--;
                if (out.n > root)
                    out.n--;
                out.p[out.n] = 0;
            }
        } else {
            if (out.n > root)
                put(&out, "/", 1);
            put(&out, p, len);
        }
        p += len;
    }
    free(joined.p);
    return out.p;
}

/* os.path.dirname(PATH) or ".". */
static char *dirname_of(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    size_t n = (size_t)(slash - path) + 1;
    size_t all = 0;
    while (all < n && path[all] == '/')
        all++;
    if (all < n)
        while (n > 0 && path[n - 1] == '/')
            n--;
    char *head = strndup(path, n);
    return n ? head : strdup(".");
}

static char *join(const char *a, const char *b) {
    struct buf out = {0};
    puts_(&out, a);
    if (out.n && out.p[out.n - 1] != '/')
        puts_(&out, "/");
    puts_(&out, b);
    return out.p;
}

/* -- the command line --------------------------------------------------------------- */

struct options {
    int verbose, tty, no_tty, no_agent;
    char **announce, **alerts, **env, **positional;
    int n_announce, n_alerts, n_env, n_positional;
    int fds[MAX_FDS];
    int n_fds;
    const char *timeout, *revoked;
};

static int digits(const char *s) {
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* rexnet.cli.launcher.parse in C: returns 0 (then the Python launcher reads it) for
 * anything it does not follow. */
static int parse(char **tokens, int count, struct options *o) {
    enum { BEFORE, IN, AFTER } block = BEFORE;
    int only_positional = 0;
    size_t size = sizeof(char *) * (size_t)(count + 1);
    o->announce = malloc(size);
    o->alerts = malloc(size);
    o->env = malloc(size);
    o->positional = malloc(size);
    if (!o->announce || !o->alerts || !o->env || !o->positional)
        return 0;
    for (int i = 0; i < count;) {
        char *token = tokens[i++];
        if (only_positional && strcmp(token, "--") == 0)
            return 0;
        if (only_positional || strcmp(token, "-") == 0 || token[0] != '-') {
            if (block == AFTER)
                return 0;
            block = IN;
            o->positional[o->n_positional++] = token;
            continue;
        }
        if (strcmp(token, "--") == 0) {
            if (block == AFTER)
                return 0;
            only_positional = 1;
            continue;
        }
        if (block == IN)
            block = AFTER;
        char name[64];
        const char *value;
        int eq = 0;
        if (token[1] == '-') {
            const char *equals = strchr(token, '=');
            size_t n = equals ? (size_t)(equals - token) : strlen(token);
            if (n >= sizeof name)
                return 0;
            memcpy(name, token, n);
            name[n] = 0;
            eq = equals != NULL;
            value = equals ? equals + 1 : "";
        } else {
            name[0] = token[0];
            name[1] = token[1];
            name[2] = 0;
            value = token + 2;
        }
        int *flag = NULL;
        if (!strcmp(name, "-v") || !strcmp(name, "--verbose")) flag = &o->verbose;
        else if (!strcmp(name, "-t")) flag = &o->tty;
        else if (!strcmp(name, "-T")) flag = &o->no_tty;
        else if (!strcmp(name, "--no-agent")) flag = &o->no_agent;
        if (flag && !eq && !*value) {
            *flag = 1;
            continue;
        }
        int valued = !strcmp(name, "-a") || !strcmp(name, "--announce") ||
                     !strcmp(name, "--timeout") || !strcmp(name, "--alerts") ||
                     !strcmp(name, "--fd") || !strcmp(name, "-e") || !strcmp(name, "--env") ||
                     !strcmp(name, "--revoked");
        if (token[1] != '-' && !valued) { /* -vT */
            int all = 1;
            for (const char *c = token + 1; *c; c++)
                if (*c != 'v' && *c != 't' && *c != 'T')
                    all = 0;
            if (all) {
                for (const char *c = token + 1; *c; c++)
                    *(*c == 'v' ? &o->verbose : *c == 't' ? &o->tty : &o->no_tty) = 1;
                continue;
            }
        }
        if (!valued)
            return 0;
        if (!eq && !*value) {
            if (i >= count || tokens[i][0] == '-')
                return 0;
            value = tokens[i++];
        }
        if (!strcmp(name, "--timeout")) {
            /* only plain decimals here; Python reads the rest (and says what is wrong) */
            const char *dot = strchr(value, '.');
            char whole[64];
            size_t n = dot ? (size_t)(dot - value) : strlen(value);
            if (n == 0 || n >= sizeof whole)
                return 0;
            memcpy(whole, value, n);
            whole[n] = 0;
            if (!digits(whole) || (dot && !digits(dot + 1)))
                return 0;
            o->timeout = value;
        } else if (!strcmp(name, "--fd")) {
            if (!digits(value) || strlen(value) > 3 || o->n_fds >= MAX_FDS)
                return 0;
            o->fds[o->n_fds++] = atoi(value);
        } else if (!strcmp(name, "--revoked")) {
            o->revoked = value;
        } else if (!strcmp(name, "-a") || !strcmp(name, "--announce")) {
            o->announce[o->n_announce++] = (char *)value;
        } else if (!strcmp(name, "--alerts")) {
            o->alerts[o->n_alerts++] = (char *)value;
        } else {
            o->env[o->n_env++] = (char *)value;
        }
    }
    return o->n_positional > 0;
}

static int short_strings(char **items, int n, int count, size_t limit) {
    if (n > count)
        return 0;
    for (int i = 0; i < n; i++)
        if (strlen(items[i]) > limit)
            return 0;
    return 1;
}

/* rexnet.cli.request.build in C, as the Exec message's JSON; 0 to leave it to Python. */
static int exec_message(struct options *o, unsigned long netns, struct buf *b) {
    char *keyfile = o->positional[0];
    struct stat info;
    if (stat(keyfile, &info) != 0 && !strchr(keyfile, '/'))
        return 0; /* an application's name: the configuration says which credential */
    double timeout = 30.0;
    if (o->timeout) {
        timeout = strtod(o->timeout, NULL);
        if (!(timeout > 0 && timeout <= 1e9))
            return 0;
    }
    if (o->tty && o->no_tty)
        return 0;
    if (o->tty || (!o->no_tty && isatty(0)))
        return 0; /* a terminal: raw mode and window sizes are the Python launcher's */
    int fds[MAX_FDS], n_fds = 0;
    const char *modes[MAX_FDS];
    for (int i = 0; i < o->n_fds; i++) {
        int fd = o->fds[i], seen = 0;
        if (fd < 3 || fd > 255)
            return 0;
        int flags = fcntl(fd, F_GETFL);
        if (flags < 0)
            return 0;
        for (int k = 0; k < n_fds; k++)
            seen |= fds[k] == fd;
        if (seen)
            continue;
        fds[n_fds] = fd;
        modes[n_fds++] = (flags & O_ACCMODE) == O_RDONLY ? "r"
                         : (flags & O_ACCMODE) == O_WRONLY ? "w" : "rw";
    }
    char **names = malloc(sizeof(char *) * (size_t)(o->n_env + 1));
    char **values = malloc(sizeof(char *) * (size_t)(o->n_env + 1));
    int n_env = 0;
    if (!names || !values)
        return 0;
    for (int i = 0; i < o->n_env; i++) {
        char *spec = o->env[i], *equals = strchr(spec, '=');
        size_t n = equals ? (size_t)(equals - spec) : strlen(spec);
        if (n == 0)
            return 0;
        char *name = strndup(spec, n), *value = equals ? equals + 1 : getenv(name);
        if (!value)
            continue;
        if (utf8_length(name) < 0 || (size_t)utf8_length(name) > MAX_NAME ||
            strlen(value) > MAX_ARG)
            return 0;
        names[n_env] = name;
        values[n_env++] = value;
    }
    char *group = getenv("GROUP"), *fallback_target = group && *group ? group : "255.255.255.255";
    char **announce = o->n_announce ? o->announce : &fallback_target;
    int n_announce = o->n_announce ? o->n_announce : 1;
    char **args = o->positional + 1;
    int n_args = o->n_positional - 1;
    if (n_env > MAX_ENV || !short_strings(args, n_args, MAX_ARGS, MAX_ARG) ||
        !short_strings(announce, n_announce, MAX_TARGETS, MAX_TARGET) ||
        !short_strings(o->alerts, o->n_alerts, MAX_TARGETS, MAX_TARGET))
        return 0;

    char number[64];
    put(b, "\0\0\0\0", 4); /* the length, filled in below */
    puts_(b, "{\"op\":\"exec\",\"keyfile\":");
    json_string(b, keyfile);
    puts_(b, ",\"keypath\":");
    json_string(b, abspath(keyfile));
    puts_(b, ",\"args\":");
    json_strings(b, args, n_args);
    puts_(b, ",\"announce\":");
    json_strings(b, announce, n_announce);
    puts_(b, ",\"alerts\":");
    json_strings(b, o->alerts, o->n_alerts);
    snprintf(number, sizeof number, ",\"timeout\":%.17g,\"revoked\":", timeout);
    puts_(b, number);
    json_string(b, o->revoked && *o->revoked ? abspath(o->revoked) : "");
    puts_(b, o->verbose ? ",\"verbose\":true" : ",\"verbose\":false");
    puts_(b, ",\"tty\":false,\"raw\":false,\"term\":\"\",\"rows\":0,\"cols\":0,\"fds\":[");
    for (int i = 0; i < n_fds; i++) {
        snprintf(number, sizeof number, "%s[%d,\"%s\"]", i ? "," : "", fds[i], modes[i]);
        puts_(b, number);
    }
    puts_(b, "],\"env\":[");
    for (int i = 0; i < n_env; i++) {
        puts_(b, i ? ",[" : "[");
        json_string(b, names[i]);
        put(b, ",", 1);
        json_string(b, values[i]);
        put(b, "]", 1);
    }
    /* the job's directory: ours, as rexnet.cli.request.working_directory says ("" if gone;
       a path too long to send is sent as "", as a gone one) */
    char here[4097];
    const char *cwd = getcwd(here, sizeof here) ? here : "";
    puts_(b, "],\"cwd\":");
    json_string(b, strlen(cwd) <= 4096 ? cwd : "");
    snprintf(number, sizeof number, ",\"netns\":%lu}", netns);
    puts_(b, number);
    size_t length = b->n - 4;
    if (length > MAX_MESSAGE)
        return 0;
    for (int i = 0; i < 4; i++)
        b->p[i] = (char)((length >> (24 - 8 * i)) & 0xFF);
    memcpy(o->fds, fds, sizeof(int) * (size_t)n_fds);
    o->n_fds = n_fds;
    return 1;
}

/* -- the agent's socket ------------------------------------------------------------- */

static char *socket_path(unsigned long netns) {
    char name[64];
    snprintf(name, sizeof name, "agent-%lu.sock", netns);
    const char *explicit = getenv("REXNET_AGENT_SOCKET");
    if (explicit && *explicit)
        return abspath(explicit);
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    char base[64];
    snprintf(base, sizeof base, "/tmp/rexnet-%u", (unsigned)getuid());
    return join(runtime && *runtime ? join(runtime, "rexnet") : base, name);
}

/* A connection to a trusted agent at PATH, or -1 (then the Python launcher starts one, or
 * refuses the socket with its message and runs standalone). */
static int connect_agent(const char *path) {
    struct stat info;
    char *directory = dirname_of(path);
    if (lstat(directory, &info) != 0 || !S_ISDIR(info.st_mode) || info.st_uid != getuid() ||
        (info.st_mode & 077))
        return -1;
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof address.sun_path)
        return -1;
    strcpy(address.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    struct ucred peer;
    socklen_t size = sizeof peer;
    if (connect(sock, (struct sockaddr *)&address, sizeof address) != 0 ||
        getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &size) != 0 ||
        peer.uid != getuid()) {
        close(sock);
        return -1;
    }
    return sock;
}

/* -- the agent's answers ------------------------------------------------------------ */

struct reader {
    const char *p, *end;
    const char *error;
};

static void skip_ws(struct reader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static void utf8_put(struct buf *b, unsigned cp) {
    char out[4];
    if (cp < 0x80) { out[0] = (char)cp; put(b, out, 1); }
    else if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); put(b, out, 2);
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)); put(b, out, 3);
    } else {
        out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F));
        put(b, out, 4);
    }
}

static int hex4(const char *p, unsigned *value) {
    *value = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return 0;
        *value = *value * 16 + (unsigned)d;
    }
    return 1;
}

/* A JSON string at r->p (after its opening quote) into OUT (if not NULL). */
static int read_string(struct reader *r, struct buf *out) {
    struct buf sink = {0};
    if (!out)
        out = &sink;
    while (r->p < r->end) {
        char c = *r->p++;
        if (c == '"') {
            if (!out->p)
                put(out, "", 0);
            free(sink.p);
            return 1;
        }
        if ((unsigned char)c < 0x20)
            break;
        if (c != '\\') {
            put(out, &c, 1);
            continue;
        }
        if (r->p >= r->end)
            break;
        char e = *r->p++;
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            put(out, &"\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"], 1);
            continue;
        }
        unsigned cp, low;
        if (e != 'u' || r->end - r->p < 4 || !hex4(r->p, &cp))
            break;
        r->p += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF && r->end - r->p >= 6 && r->p[0] == '\\' &&
            r->p[1] == 'u' && hex4(r->p + 2, &low) && low >= 0xDC00 && low <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            r->p += 6;
        } else if (cp >= 0xD800 && cp <= 0xDFFF) {
            cp = 0xFFFD; /* a lone surrogate */
        }
        utf8_put(out, cp);
    }
    free(sink.p);
    r->error = "a string is malformed";
    return 0;
}

/* Skip one JSON value (or read it: a string into STR, an integer into NUMBER). */
static int read_value(struct reader *r, int depth, struct buf *str, long *number, int *kind) {
    skip_ws(r);
    if (depth > MAX_DEPTH) {
        r->error = "message nested too deeply";
        return 0;
    }
    if (r->p >= r->end) {
        r->error = "truncated JSON";
        return 0;
    }
    char c = *r->p;
    *kind = c;
    if (c == '"') {
        r->p++;
        return read_string(r, str);
    }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        int inner;
        r->p++;
        skip_ws(r);
        if (r->p < r->end && *r->p == close) {
            r->p++;
            return 1;
        }
        for (;;) {
            if (c == '{') {
                skip_ws(r);
                if (r->p >= r->end || *r->p++ != '"' || !read_string(r, NULL))
                    return r->error = r->error ? r->error : "object key is not a string", 0;
                skip_ws(r);
                if (r->p >= r->end || *r->p++ != ':')
                    return r->error = "no ':' after an object key", 0;
            }
            if (!read_value(r, depth + 1, NULL, NULL, &inner))
                return 0;
            skip_ws(r);
            if (r->p < r->end && *r->p == close) {
                r->p++;
                return 1;
            }
            if (r->p >= r->end || *r->p++ != ',')
                return r->error = "no ',' between items", 0;
        }
    }
    const char *start = r->p;
    while (r->p < r->end && strchr("0123456789+-.eEtruefalsn", *r->p) && *r->p)
        r->p++;
    size_t n = (size_t)(r->p - start);
    if (n == 0 || n > 30)
        return r->error = "bad JSON value", 0;
    char token[32];
    memcpy(token, start, n);
    token[n] = 0;
    if (!strcmp(token, "true") || !strcmp(token, "false") || !strcmp(token, "null"))
        return 1;
    char *end;
    errno = 0;
    long value = strtol(token, &end, 10);
    if (*end == 0 && errno == 0) {
        *kind = 'i';
        if (number)
            *number = value;
        return 1;
    }
    strtod(token, &end);
    if (*end != 0)
        return r->error = "bad number", 0;
    *kind = 'f';
    return 1;
}

struct answer {
    char op[16];
    struct buf text;
    long status;
    int has_text, has_status;
};

/* One agent message (a JSON object); 0 with r->error if it is not one. */
static int read_answer(struct reader *r, struct answer *a) {
    skip_ws(r);
    if (r->p >= r->end || *r->p++ != '{')
        return r->error = "message is not a JSON object", 0;
    skip_ws(r);
    if (r->p < r->end && *r->p == '}') {
        r->p++;
    } else {
        for (;;) {
            struct buf key = {0};
            skip_ws(r);
            if (r->p >= r->end || *r->p++ != '"' || !read_string(r, &key))
                return r->error = r->error ? r->error : "object key is not a string", 0;
            skip_ws(r);
            if (r->p >= r->end || *r->p++ != ':')
                return r->error = "no ':' after an object key", 0;
            struct buf value = {0};
            long number = 0;
            int kind = 0, is_text = !strcmp(key.p, "text") || !strcmp(key.p, "message");
            int is_op = !strcmp(key.p, "op");
            if (!read_value(r, 1, is_text || is_op ? &value : NULL, &number, &kind))
                return 0;
            if (is_op && kind == '"' && value.n < sizeof a->op)
                memcpy(a->op, value.p, value.n + 1);
            if (is_text && kind == '"') {
                free(a->text.p);
                a->text = value;
                a->has_text = 1;
            } else {
                free(value.p);
            }
            if (!strcmp(key.p, "status") && kind == 'i') {
                a->status = number;
                a->has_status = 1;
            }
            free(key.p);
            skip_ws(r);
            if (r->p < r->end && *r->p == '}') {
                r->p++;
                break;
            }
            if (r->p >= r->end || *r->p++ != ',')
                return r->error = "no ',' between object members", 0;
        }
    }
    skip_ws(r);
    if (r->p != r->end)
        return r->error = "extra data after the JSON value", 0;
    return 1;
}

/* -- the job ------------------------------------------------------------------------ */

static int signal_pipe[2] = {-1, -1};

static void caught(int number) {
    int saved = errno;
    unsigned char byte = (unsigned char)number;
    if (write(signal_pipe[1], &byte, 1) < 0) {
    }
    errno = saved;
}

static void say(const char *text, size_t n) {
    while (n > 0) {
        ssize_t done = write(2, text, n);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            return;
        text += done;
        n -= (size_t)done;
    }
}

static void blocking(const int *fds, int n) {
    for (int i = -3; i < n; i++) {
        int fd = i < 0 ? i + 3 : fds[i];
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0 && (flags & O_NONBLOCK))
            fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    }
}

static int finish(const int *fds, int n, int status, const char *message) {
    blocking(fds, n);
    if (message && *message) {
        say(message, strlen(message));
        say("\n", 1);
    }
    return status;
}

/* Send the Exec message with the descriptors; 0 if it could not be sent (nothing ran). */
static int send_request(int sock, struct buf *message, const int *extra, int n_extra) {
    int fds[3 + MAX_FDS];
    for (int i = 0; i < 3; i++)
        fds[i] = i;
    memcpy(fds + 3, extra, sizeof(int) * (size_t)n_extra);
    size_t rights = sizeof(int) * (size_t)(3 + n_extra);
    char control[CMSG_SPACE(sizeof(int) * (3 + MAX_FDS))];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = message->p, .iov_len = message->n};
    struct msghdr header = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                            .msg_controllen = CMSG_SPACE(rights)};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&header);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(rights);
    memcpy(CMSG_DATA(cmsg), fds, rights);
    ssize_t sent;
    do
        sent = sendmsg(sock, &header, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0)
        return 0;
    size_t done = (size_t)sent;
    while (done < message->n) {
        sent = send(sock, message->p + done, message->n - done, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent <= 0)
            return 0;
        done += (size_t)sent;
    }
    return 1;
}

static int run(int sock, const char *path, struct buf *message, const int *fds, int n_fds) {
    static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    if (pipe2(signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        fallback();
    struct sigaction action = {.sa_handler = caught};
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaction(forwarded[i], &action, NULL);
    if (!send_request(sock, message, fds, n_fds)) {
        close(sock);
        fallback(); /* the agent went away before it had the request: Python tries again */
    }
    struct buf in = {0};
    for (;;) {
        struct pollfd watch[2] = {{.fd = sock, .events = POLLIN},
                                  {.fd = signal_pipe[0], .events = POLLIN}};
        if (poll(watch, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (watch[1].revents & POLLIN) {
            unsigned char numbers[64];
            ssize_t n = read(signal_pipe[0], numbers, sizeof numbers);
            for (ssize_t i = 0; i < n; i++) {
                char text[48];
                int length = snprintf(text + 4, sizeof text - 4,
                                      "{\"op\":\"signal\",\"number\":%d}", numbers[i]);
                text[0] = text[1] = text[2] = 0;
                text[3] = (char)length;
                send(sock, text, (size_t)length + 4, MSG_NOSIGNAL);
            }
        }
        if (!(watch[0].revents & (POLLIN | POLLHUP | POLLERR)))
            continue;
        char chunk[65536];
        ssize_t got = recv(sock, chunk, sizeof chunk, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        put(&in, chunk, (size_t)got);
        while (in.n >= 4) {
            const unsigned char *h = (const unsigned char *)in.p;
            uint32_t length = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 |
                              (uint32_t)h[2] << 8 | h[3];
            if (length > MAX_MESSAGE)
                return finish(fds, n_fds, 255,
                              "rexnet: bad message from the agent: message too long");
            if (in.n < 4 + (size_t)length)
                break;
            struct reader r = {.p = in.p + 4, .end = in.p + 4 + length};
            struct answer a = {0};
            struct buf error = {0};
            if (utf8_check(in.p + 4, length) >= 0 && read_answer(&r, &a)) {
                if (!strcmp(a.op, "say") && a.has_text) {
                    say(a.text.p, a.text.n);
                } else if (!strcmp(a.op, "exit") && a.has_status && a.status >= 0 &&
                           a.status <= 255 && a.has_text) {
                    return finish(fds, n_fds, (int)a.status, a.text.p);
                } else if (strcmp(a.op, "say") && strcmp(a.op, "exit") &&
                           strcmp(a.op, "stopped")) {
                    r.error = "unknown message kind";
                } else {
                    r.error = "field missing or of the wrong type";
                }
            } else if (!r.error) {
                r.error = "message is not UTF-8 JSON";
            }
            if (r.error) {
                puts_(&error, "rexnet: bad message from the agent: ");
                puts_(&error, r.error);
                return finish(fds, n_fds, 255, error.p);
            }
            free(a.text.p);
            memmove(in.p, in.p + 4 + length, in.n - 4 - length);
            in.n -= 4 + length;
        }
    }
    struct buf lost = {0};
    size_t n = strlen(path);
    puts_(&lost, "rexnet: lost the agent before the job finished (its log: ");
    put(&lost, path, n >= 5 && !strcmp(path + n - 5, ".sock") ? n - 5 : n);
    puts_(&lost, ".log); the job was ended");
    return finish(fds, n_fds, 255, lost.p);
}

int main(int argc, char **argv) {
    original_argv = argv;
    standard_descriptors();
    signal(SIGPIPE, SIG_IGN); /* as Python does: a closed stderr is an error, not a death */
    const char *name = strrchr(argv[0], '/');
    name = name ? name + 1 : argv[0];
    cexec_mode = strncmp(name, "cexec", 5) == 0;
    char **tokens = argv + 1;
    int count = argc - 1;
    if (!cexec_mode) {
        if (argc < 2 || strcmp(argv[1], "exec") != 0)
            fallback();
        tokens++;
        count--;
    }
    const char *no_agent = getenv("REXNET_NO_AGENT");
    if (no_agent && *no_agent && strcmp(no_agent, "0") != 0)
        fallback();
    struct options o = {0};
    if (!parse(tokens, count, &o) || o.no_agent)
        fallback();
    struct stat ns;
    unsigned long netns = stat("/proc/self/ns/net", &ns) == 0 ? (unsigned long)ns.st_ino : 0;
    struct buf message = {0};
    if (!exec_message(&o, netns, &message))
        fallback();
    char *path = socket_path(netns);
    int sock = connect_agent(path);
    if (sock < 0)
        fallback();
    return run(sock, path, &message, o.fds, o.n_fds);
}
