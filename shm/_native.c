/* The ring's hot operations in C: the same interface and rules as _pycore.py, rule for rule.
 *
 * Writer and Reader each hold a buffer export of the region's mmap (so the mapping cannot be
 * unmapped under them) until release(). The layout is docs/shm.md's: a 256-byte header of
 * 64-bit slots, a data area of `capacity` bytes, frames of an 8-byte header (u32 length, u32
 * flags) and a payload padded to 8 bytes, a padding frame at the wrap.
 *
 * Memory ordering is the Python core's: the payload and the frame header are written before the
 * counter that publishes them, and the counter is published with one aligned 8-byte store
 * (__atomic_store_n, a single `mov` on x86-64, release order elsewhere); counters are read with
 * one 8-byte load (acquire). A full fence (__atomic_thread_fence(SEQ_CST), `mfence`) sits where
 * the Python code fences: between publishing a counter and reading the peer's flags, and between
 * announcing sleep and re-checking the ring. Everything read from the peer is validated before
 * use, and a frame header word is read once into a local, so a peer that rewrites it meanwhile
 * changes nothing we act on.
 *
 * The GIL is held throughout, except around sched_yield() in spin(); after taking it back, the
 * first thing checked is whether the side was released meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 256
#define SLOT_HEAD 8
#define SLOT_TAIL 16
#define SLOT_CONSUMER_FLAGS 24
#define SLOT_PRODUCER_FLAGS 25
#define SIDE_SLEEPING 1u
#define SIDE_CLOSED 2u
#define FRAME_HEADER 8
#define FLAG_PADDING 1u
#define MIN_CAPACITY 64
#define MAX_CAPACITY (1ull << 40)

static PyObject *CorruptedError, *TooLargeError, *BrokenError, *ClosedError;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    volatile uint64_t *hdr;  /* the ring header, 32 slots */
    unsigned char *data;     /* the data area */
    uint64_t capacity, mask, max_payload, offset;
    uint64_t head, tail;     /* local copies: ours is ahead of what is published */
    int bell;                /* the write end of the peer's doorbell, or -1 */
    int my_flags, peer_flags;
    unsigned long long frames, bytes, wakeups, full;
    PyObject *broken;        /* the quarantine error, once raised */
    int bell_dirty;          /* `wait` woke on the doorbell and left draining it for later */
} Core;

static inline uint64_t load64(volatile uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store64(volatile uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline volatile uint64_t *word_at(Core *c, uint64_t off) {
    return (volatile uint64_t *)(c->data + off);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void ring_bell(int fd) {
    /* Full pipe (EAGAIN): the sleeper is woken already. No reader (EPIPE): nobody to wake. */
    static const char one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, 1);
    } while (r < 0 && errno == EINTR);
}

/* -- errors ------------------------------------------------------------------------------------ */

static PyObject *corrupt(Core *c, const char *what) {
    char text[512];
    snprintf(text, sizeof text, "peer corrupted the ring at offset %llu: %s; the ring is quarantined",
             (unsigned long long)c->offset, what);
    if (CorruptedError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, text);
        return NULL;
    }
    PyObject *exc = PyObject_CallFunction(CorruptedError, "s", text);
    if (exc != NULL) {
        Py_XSETREF(c->broken, exc);
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    }
    return NULL;
}

static PyObject *raise_unusable(Core *c) {
    if (ClosedError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "multikernel.shm._native.init() was not called");
        return NULL;
    }
    if (c->broken != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(c->broken), c->broken);
    } else {
        PyObject *exc = PyObject_CallNoArgs(ClosedError);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    }
    return NULL;
}

#define CHECK_USABLE(c)                                        \
    do {                                                       \
        if (!(c)->has_view || (c)->broken != NULL)             \
            return raise_unusable(c);                          \
    } while (0)

static PyObject *raise_message(PyObject *type, const char *text) {
    if (type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, text);
        return NULL;
    }
    PyObject *exc = PyObject_CallFunction(type, "s", text);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *too_large(Core *c, Py_ssize_t n) {
    char text[256];
    snprintf(text, sizeof text,
             "a %zd-byte frame exceeds this ring's maximum payload of %llu bytes (capacity %llu); "
             "split it or create a larger ring",
             n, (unsigned long long)c->max_payload, (unsigned long long)c->capacity);
    return raise_message(TooLargeError, text);
}

/* -- life cycle -------------------------------------------------------------------------------- */

static int core_init(Core *c, PyObject *args, int my_flags, int peer_flags) {
    PyObject *buffer;
    unsigned long long offset, capacity;
    int bell;
    if (!PyArg_ParseTuple(args, "OKKi", &buffer, &offset, &capacity, &bell))
        return -1;
    if (c->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "a ring core is initialised once");
        return -1;
    }
    if (capacity < MIN_CAPACITY || capacity > MAX_CAPACITY || (capacity & (capacity - 1)) ||
        offset % 64) {
        PyErr_SetString(PyExc_ValueError, "bad ring capacity or offset");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &c->view, PyBUF_WRITABLE) < 0)
        return -1;
    if ((unsigned long long)c->view.len < offset + HEADER_SIZE + capacity ||
        ((uintptr_t)c->view.buf + offset) % 64) {
        PyBuffer_Release(&c->view);
        PyErr_SetString(PyExc_ValueError, "the ring does not fit in the buffer");
        return -1;
    }
    c->has_view = 1;
    c->hdr = (volatile uint64_t *)((unsigned char *)c->view.buf + offset);
    c->data = (unsigned char *)c->view.buf + offset + HEADER_SIZE;
    c->offset = offset;
    c->capacity = capacity;
    c->mask = capacity - 1;
    c->max_payload = capacity / 2 - FRAME_HEADER;
    c->head = load64(&c->hdr[SLOT_HEAD]);
    c->tail = load64(&c->hdr[SLOT_TAIL]);
    c->bell = bell;
    c->my_flags = my_flags;
    c->peer_flags = peer_flags;
    return 0;
}

static int writer_init(Core *c, PyObject *args, PyObject *kw) {
    return core_init(c, args, SLOT_PRODUCER_FLAGS, SLOT_CONSUMER_FLAGS);
}

static int reader_init(Core *c, PyObject *args, PyObject *kw) {
    return core_init(c, args, SLOT_CONSUMER_FLAGS, SLOT_PRODUCER_FLAGS);
}

static void core_release_view(Core *c) {
    if (c->has_view) {
        c->has_view = 0;
        c->hdr = NULL;
        c->data = NULL;
        PyBuffer_Release(&c->view);
    }
}

static void core_dealloc(Core *c) {
    core_release_view(c);
    Py_CLEAR(c->broken);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* -- what both sides share ------------------------------------------------------------------- */

static PyObject *core_announce(Core *c, PyObject *unused) {
    if (!c->has_view)
        return raise_unusable(c);
    volatile uint64_t *slot = &c->hdr[c->my_flags];
    store64(slot, load64(slot) | SIDE_SLEEPING);
    fence();
    Py_RETURN_NONE;
}

static PyObject *core_unannounce(Core *c, PyObject *unused) {
    if (c->has_view) {
        volatile uint64_t *slot = &c->hdr[c->my_flags];
        store64(slot, load64(slot) & ~(uint64_t)SIDE_SLEEPING);
    }
    Py_RETURN_NONE;
}

static PyObject *core_my_flags(Core *c, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(c->has_view ? load64(&c->hdr[c->my_flags]) : 0);
}

static PyObject *core_peer_flags(Core *c, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(c->has_view ? load64(&c->hdr[c->peer_flags]) : 0);
}

static PyObject *core_backlog(Core *c, PyObject *unused) {
    if (!c->has_view)
        return PyLong_FromLong(0);
    uint64_t tail = load64(&c->hdr[SLOT_TAIL]), head = load64(&c->hdr[SLOT_HEAD]);
    return PyLong_FromLongLong((long long)(tail - head));
}

static PyObject *core_set_closed(Core *c, PyObject *unused) {
    if (c->has_view) {
        volatile uint64_t *slot = &c->hdr[c->my_flags];
        store64(slot, (load64(slot) | SIDE_CLOSED) & ~(uint64_t)SIDE_SLEEPING);
        fence();
        if (c->bell >= 0)
            ring_bell(c->bell);
    }
    Py_RETURN_NONE;
}

/* Empty the doorbell pipe (bounded, whatever the peer wrote: a short read, EAGAIN or end of file
 * ends it). */
static void drain_bell(int bell) {
    static char scratch[65536]; /* what is read is thrown away: sharing it is harmless */
    if (read(bell, scratch, 64) < 64)
        return;
    for (int i = 0; i < 16; i++)
        if (read(bell, scratch, sizeof scratch) < (ssize_t)sizeof scratch)
            return;
}

/* After waking: clear our sleeping flag, then empty the doorbell pipe. Nothing if the side was
 * released. */
static void woken(Core *c, int bell) {
    if (!c->has_view)
        return;
    volatile uint64_t *slot = &c->hdr[c->my_flags];
    store64(slot, load64(slot) & ~(uint64_t)SIDE_SLEEPING);
    c->bell_dirty = 0;
    if (bell >= 0)
        drain_bell(bell);
}

static PyObject *core_woken(Core *c, PyObject *arg) {
    int bell = PyLong_AsLong(arg);
    if (bell == -1 && PyErr_Occurred())
        return NULL;
    woken(c, bell);
    Py_RETURN_NONE;
}

static int writer_ready(Core *c, uint64_t n);
static int reader_ready(Core *c, uint64_t n);
static PyObject *reader_try_receive(Core *c, PyObject *unused);

/* The next frame, or `status` if there is none after all (the writer only closed). */
static PyObject *reader_take_one(Core *c, int status) {
    PyObject *frame = reader_try_receive(c, NULL);
    if (frame == Py_None) {
        Py_DECREF(frame);
        return PyLong_FromLong(status);
    }
    return frame;
}

/* What `wait` found; the same numbers as WAIT_* in _pycore.py. */
enum { WAIT_READY = 0, WAIT_READY_SLEPT = 1, WAIT_TIMEOUT = 2, WAIT_PEER_CLOSED = 3,
       WAIT_WOKEN_EMPTY = 4, WAIT_SLEEP = 5 };

/* wait(wait_fd, bell_fd, timeout_ms, n, live_fd=-1): the sleep half of a wait, after the spin.
 * Announces sleep (flag, full fence), looks again (a frame to read, or room for `n` bytes; a
 * reader that passes n = -1 gets the frame itself, taken as soon as it woke, instead of
 * WAIT_READY_SLEPT), and unless that found something or the peer's closed flag, sleeps with the
 * GIL released: in poll() on the doorbell and the liveness fd themselves when wait_fd is -1 (one
 * wake-up, no epoll in between), else on `wait_fd` (the wait set's epoll fd). On waking it clears
 * the flag and looks again. The byte that woke it is drained at the start of the next wait, not
 * now: that read is not on the path from the wake-up to the frame. Returns one of WAIT_*; a
 * signal is a spurious wake (WAIT_WOKEN_EMPTY) unless its handler raised. */
static PyObject *core_wait(Core *c, PyObject *const *args, Py_ssize_t nargs) {
    long v[5] = {0, 0, 0, 0, -1};
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "wait(wait_fd, bell_fd, timeout_ms, n, live_fd=-1)");
        return NULL;
    }
    for (int i = 0; i < nargs; i++) {
        v[i] = PyLong_AsLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!c->has_view || c->broken != NULL)
        return raise_unusable(c);
    if (c->bell_dirty && v[1] >= 0) {
        c->bell_dirty = 0;
        drain_bell((int)v[1]);
    }
    int (*ready)(Core *, uint64_t) = c->my_flags == SLOT_PRODUCER_FLAGS ? writer_ready : reader_ready;
    volatile uint64_t *slot = &c->hdr[c->my_flags];
    store64(slot, load64(slot) | SIDE_SLEEPING);
    fence();
    int status = -1;
    if (ready(c, (uint64_t)v[3]))
        status = load64(&c->hdr[c->peer_flags]) & SIDE_CLOSED ? WAIT_PEER_CLOSED : WAIT_READY;
    if (status >= 0) {
        store64(slot, load64(slot) & ~(uint64_t)SIDE_SLEEPING);
        return PyLong_FromLong(status);
    }
    struct pollfd p[2] = {{.fd = (int)v[0], .events = POLLIN}, {.fd = -1, .events = POLLIN}};
    nfds_t nfds = 1;
    if (v[0] < 0) {
        p[0].fd = (int)v[1];
        p[1].fd = (int)v[4];
        nfds = v[4] >= 0 ? 2 : 1;
    }
    int r, err;
    Py_BEGIN_ALLOW_THREADS
    r = poll(p, nfds, (int)v[2]);
    err = errno;
    Py_END_ALLOW_THREADS
    if (c->has_view) {
        store64(slot, load64(slot) & ~(uint64_t)SIDE_SLEEPING);
        c->bell_dirty = 1;
    }
    if (r < 0 && err != EINTR) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (r < 0 && PyErr_CheckSignals() < 0)
        return NULL;
    if (r == 0)
        return PyLong_FromLong(WAIT_TIMEOUT);
    if (!c->has_view)
        return raise_unusable(c);
    if (!ready(c, (uint64_t)v[3]))
        return PyLong_FromLong(WAIT_WOKEN_EMPTY);
    if (v[3] < 0) /* a reader that wants the frame: take it here, before any Python runs */
        return reader_take_one(c, WAIT_READY_SLEPT);
    return PyLong_FromLong(WAIT_READY_SLEPT);
}

/* n from a Python int; -1 with an exception set on error (a reader's n = -1 is fine). */
static int arg_n(PyObject *arg, long *n) {
    *n = PyLong_AsLong(arg);
    return *n == -1 && PyErr_Occurred() ? -1 : 0;
}

/* prepare_sleep(n): the first half of `wait` for a side that sleeps elsewhere (on an event
 * loop): announce sleep (flag, full fence) and look again. Something there: the flag is cleared
 * and the result is `wait`'s (a reader passing n = -1 gets the frame itself). Nothing: the flag
 * stays set and WAIT_SLEEP says to sleep now, then call after_sleep. */
static PyObject *core_prepare_sleep(Core *c, PyObject *arg) {
    long n;
    if (arg_n(arg, &n) < 0)
        return NULL;
    if (!c->has_view || c->broken != NULL)
        return raise_unusable(c);
    int (*ready)(Core *, uint64_t) = c->my_flags == SLOT_PRODUCER_FLAGS ? writer_ready : reader_ready;
    volatile uint64_t *slot = &c->hdr[c->my_flags];
    store64(slot, load64(slot) | SIDE_SLEEPING);
    fence();
    if (!ready(c, (uint64_t)n))
        return PyLong_FromLong(WAIT_SLEEP);
    store64(slot, load64(slot) & ~(uint64_t)SIDE_SLEEPING);
    int status = load64(&c->hdr[c->peer_flags]) & SIDE_CLOSED ? WAIT_PEER_CLOSED : WAIT_READY;
    if (n < 0)
        return reader_take_one(c, status);
    return PyLong_FromLong(status);
}

/* after_sleep(n): the second half: clear our flag (whoever woke us drained the doorbell) and
 * look again: `wait`'s outcomes after a sleep (WAIT_READY_SLEPT or the frame, or
 * WAIT_WOKEN_EMPTY). */
static PyObject *core_after_sleep(Core *c, PyObject *arg) {
    long n;
    if (arg_n(arg, &n) < 0)
        return NULL;
    if (!c->has_view)
        return raise_unusable(c);
    volatile uint64_t *slot = &c->hdr[c->my_flags];
    store64(slot, load64(slot) & ~(uint64_t)SIDE_SLEEPING);
    int (*ready)(Core *, uint64_t) = c->my_flags == SLOT_PRODUCER_FLAGS ? writer_ready : reader_ready;
    if (!ready(c, (uint64_t)n))
        return PyLong_FromLong(WAIT_WOKEN_EMPTY);
    if (n < 0)
        return reader_take_one(c, WAIT_READY_SLEPT);
    return PyLong_FromLong(WAIT_READY_SLEPT);
}

static PyObject *core_release(Core *c, PyObject *unused) {
    core_release_view(c);
    Py_RETURN_NONE;
}

/* After publishing and fencing: wake the peer if it announced sleep. */
static inline uint64_t wake_peer(Core *c) {
    uint64_t flags = load64(&c->hdr[c->peer_flags]);
    if ((flags & SIDE_SLEEPING) && c->bell >= 0) {
        c->wakeups++;
        ring_bell(c->bell);
    }
    return flags;
}

/* -- the writer -------------------------------------------------------------------------------- */

static int load_head(Core *c) {
    uint64_t head = load64(&c->hdr[SLOT_HEAD]);
    if (head < c->head || head > c->tail || (head & 7)) {
        char what[160];
        snprintf(what, sizeof what, "reader head moved to %llu (was %llu, tail %llu)",
                 (unsigned long long)head, (unsigned long long)c->head, (unsigned long long)c->tail);
        corrupt(c, what);
        return -1;
    }
    c->head = head;
    return 0;
}

/* Write one frame after the local tail without publishing it: 1 written, 0 no room, -1 error. */
static int put(Core *c, const void *payload, uint64_t n) {
    uint64_t size = (n + 15) & ~(uint64_t)7;
    uint64_t tail = c->tail;
    uint64_t off = tail & c->mask;
    uint64_t room = c->capacity - off;
    uint64_t pad = size > room ? room : 0;
    if (tail + pad + size - c->head > c->capacity) {
        if (load_head(c) < 0)
            return -1;
        if (tail + pad + size - c->head > c->capacity)
            return 0;
    }
    if (pad) {
        *word_at(c, off) = (pad - FRAME_HEADER) | ((uint64_t)FLAG_PADDING << 32);
        tail += pad;
        off = 0;
    }
    memcpy(c->data + off + FRAME_HEADER, payload, n);
    *word_at(c, off) = n;
    c->tail = tail + size;
    c->frames++;
    c->bytes += n;
    return 1;
}

static PyObject *publish_tail(Core *c) {
    store64(&c->hdr[SLOT_TAIL], c->tail);
    fence(); /* orders the tail store before the load of the reader's flags */
    uint64_t flags = wake_peer(c);
    if (flags & SIDE_CLOSED)
        return raise_message(BrokenError,
                             "the reader closed its side of the ring; frames sent now are not delivered");
    return Py_None;  /* borrowed: success */
}

/* Put one Python buffer: 1, 0 (no room), -1 error (too large, corrupted, not a buffer). */
static int put_object(Core *c, PyObject *obj) {
    if (PyBytes_CheckExact(obj)) {
        Py_ssize_t n = PyBytes_GET_SIZE(obj);
        if ((uint64_t)n > c->max_payload) {
            too_large(c, n);
            return -1;
        }
        return put(c, PyBytes_AS_STRING(obj), (uint64_t)n);
    }
    Py_buffer b;
    if (PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE) < 0)
        return -1;
    int r;
    if ((uint64_t)b.len > c->max_payload) {
        too_large(c, b.len);
        r = -1;
    } else {
        r = put(c, b.buf, (uint64_t)b.len);
    }
    PyBuffer_Release(&b);
    return r;
}

static PyObject *writer_try_send(Core *c, PyObject *data) {
    CHECK_USABLE(c);
    int r = put_object(c, data);
    if (r < 0)
        return NULL;
    if (r == 0) {
        c->full++;
        Py_RETURN_FALSE;
    }
    if (publish_tail(c) == NULL)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *writer_try_send_many(Core *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "try_send_many(frames, start=0)");
        return NULL;
    }
    CHECK_USABLE(c);
    Py_ssize_t start = 0;
    if (nargs == 2) {
        start = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
        if (start == -1 && PyErr_Occurred())
            return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "try_send_many needs a sequence of buffers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t total = PySequence_Fast_GET_SIZE(seq), count = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (start < 0)
        start = 0;
    for (Py_ssize_t i = start; i < total; i++) {
        int r = put_object(c, items[i]);
        if (r < 0) {
            Py_DECREF(seq);
            if (count && c->broken == NULL) {
                /* publish what was put before the bad frame, keeping the first error */
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                if (publish_tail(c) == NULL) {
                    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
                    return NULL;
                }
                PyErr_Restore(type, value, tb);
            }
            return NULL;
        }
        if (r == 0) {
            c->full++;
            break;
        }
        count++;
    }
    Py_DECREF(seq);
    if (count && publish_tail(c) == NULL)
        return NULL;
    return PyLong_FromSsize_t(count);
}

static int writer_ready(Core *c, uint64_t n) {
    uint64_t size = (n + 15) & ~(uint64_t)7;
    uint64_t room = c->capacity - (c->tail & c->mask);
    uint64_t pad = size > room ? room : 0;
    return c->tail + pad + size - load64(&c->hdr[SLOT_HEAD]) <= c->capacity ||
           (load64(&c->hdr[SLOT_CONSUMER_FLAGS]) & SIDE_CLOSED);
}

static int reader_ready(Core *c, uint64_t n) {
    return load64(&c->hdr[SLOT_TAIL]) != c->head ||
           (load64(&c->hdr[SLOT_PRODUCER_FLAGS]) & SIDE_CLOSED);
}

static PyObject *spin(Core *c, PyObject *const *args, Py_ssize_t nargs,
                      int (*ready)(Core *, uint64_t)) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "spin(ns, n=0)");
        return NULL;
    }
    long long ns = PyLong_AsLongLong(args[0]);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long n = 0;
    if (nargs == 2) {
        n = PyLong_AsUnsignedLongLong(args[1]);
        if (n == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }
    uint64_t deadline = now_ns() + (uint64_t)(ns > 0 ? ns : 0);
    while (c->has_view) {
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
        if (!c->has_view)  /* released while we yielded */
            break;
        if (ready(c, n))
            Py_RETURN_TRUE;
        if (now_ns() >= deadline)
            break;
    }
    Py_RETURN_FALSE;
}

static PyObject *writer_spin(Core *c, PyObject *const *args, Py_ssize_t nargs) {
    return spin(c, args, nargs, writer_ready);
}

static PyObject *reader_spin(Core *c, PyObject *const *args, Py_ssize_t nargs) {
    return spin(c, args, nargs, reader_ready);
}

/* -- the reader -------------------------------------------------------------------------------- */

static int load_tail(Core *c) {
    uint64_t tail = load64(&c->hdr[SLOT_TAIL]);
    if (tail < c->tail || tail > c->head + c->capacity || (tail & 7)) {
        char what[160];
        snprintf(what, sizeof what, "writer tail moved to %llu (was %llu, head %llu)",
                 (unsigned long long)tail, (unsigned long long)c->tail, (unsigned long long)c->head);
        corrupt(c, what);
        return -1;
    }
    c->tail = tail;
    return 0;
}

/* Copy out the frame at the local head and advance it (not yet published). */
static PyObject *take(Core *c) {
    uint64_t head = c->head;
    uint64_t capacity = c->capacity;
    uint64_t off = head & c->mask;
    uint64_t word = *word_at(c, off);
    char what[160];
    if (word >> 32) {
        if ((word >> 32) != FLAG_PADDING || off + FRAME_HEADER + (word & 0xFFFFFFFFull) != capacity) {
            snprintf(what, sizeof what, "bad frame header %#llx at offset %llu",
                     (unsigned long long)word, (unsigned long long)off);
            return corrupt(c, what);
        }
        head += capacity - off;
        if (head >= c->tail)
            return corrupt(c, "padding frame with no frame after it");
        off = 0;
        word = *word_at(c, 0);
        if (word >> 32) {
            snprintf(what, sizeof what, "bad frame header %#llx at offset 0", (unsigned long long)word);
            return corrupt(c, what);
        }
    }
    uint64_t size = (word + 15) & ~(uint64_t)7;
    if (word > c->max_payload || head + size > c->tail || off + size > capacity) {
        snprintf(what, sizeof what, "frame length %llu at offset %llu runs past the data",
                 (unsigned long long)word, (unsigned long long)off);
        return corrupt(c, what);
    }
    PyObject *frame = PyBytes_FromStringAndSize((const char *)c->data + off + FRAME_HEADER,
                                                (Py_ssize_t)word);
    if (frame == NULL)
        return NULL;
    c->head = head + size;
    c->frames++;
    c->bytes += word;
    return frame;
}

static inline void consumed(Core *c) {
    store64(&c->hdr[SLOT_HEAD], c->head);
    fence(); /* orders the head store before the load of the writer's flags */
    wake_peer(c);
}

static PyObject *reader_try_receive(Core *c, PyObject *unused) {
    CHECK_USABLE(c);
    if (c->head == c->tail) {
        if (load_tail(c) < 0)
            return NULL;
        if (c->head == c->tail)
            Py_RETURN_NONE;
    }
    PyObject *frame = take(c);
    if (frame == NULL)
        return NULL;
    consumed(c);
    return frame;
}

static PyObject *reader_try_receive_many(Core *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "try_receive_many(max_frames=256)");
        return NULL;
    }
    CHECK_USABLE(c);
    Py_ssize_t max_frames = 256;
    if (nargs == 1) {
        max_frames = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
        if (max_frames == -1 && PyErr_Occurred())
            return NULL;
    }
    if (c->head == c->tail) {
        if (load_tail(c) < 0)
            return NULL;
        if (c->head == c->tail)
            return PyList_New(0);
    }
    PyObject *frames = PyList_New(0);
    if (frames == NULL)
        return NULL;
    Py_ssize_t count = 0;
    while (count < max_frames && c->head != c->tail) {
        PyObject *frame = take(c);
        if (frame == NULL || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            Py_DECREF(frames);
            return NULL;
        }
        Py_DECREF(frame);
        count++;
    }
    consumed(c);
    return frames;
}

/* -- attributes -------------------------------------------------------------------------------- */

static PyObject *get_closed(Core *c, void *unused) { return PyBool_FromLong(!c->has_view); }
static PyObject *get_broken(Core *c, void *unused) {
    PyObject *b = c->broken ? c->broken : Py_None;
    Py_INCREF(b);
    return b;
}
static PyObject *get_capacity(Core *c, void *unused) { return PyLong_FromUnsignedLongLong(c->capacity); }
static PyObject *get_max_payload(Core *c, void *unused) { return PyLong_FromUnsignedLongLong(c->max_payload); }
static PyObject *get_frames(Core *c, void *unused) { return PyLong_FromUnsignedLongLong(c->frames); }
static PyObject *get_bytes(Core *c, void *unused) { return PyLong_FromUnsignedLongLong(c->bytes); }
static PyObject *get_wakeups(Core *c, void *unused) { return PyLong_FromUnsignedLongLong(c->wakeups); }
static PyObject *get_full(Core *c, void *unused) { return PyLong_FromUnsignedLongLong(c->full); }
static PyObject *get_implementation(Core *c, void *unused) { return PyUnicode_FromString("native"); }

static PyGetSetDef core_getset[] = {
    {"closed", (getter)get_closed, NULL, "released: every call raises the closed error", NULL},
    {"broken", (getter)get_broken, NULL, "the quarantine error, or None", NULL},
    {"capacity", (getter)get_capacity, NULL, NULL, NULL},
    {"max_payload", (getter)get_max_payload, NULL, NULL, NULL},
    {"frames", (getter)get_frames, NULL, NULL, NULL},
    {"bytes", (getter)get_bytes, NULL, NULL, NULL},
    {"wakeups", (getter)get_wakeups, NULL, NULL, NULL},
    {"full", (getter)get_full, NULL, NULL, NULL},
    {"implementation", (getter)get_implementation, NULL, NULL, NULL},
    {NULL},
};

#define SHARED_METHODS                                                                       \
    {"announce", (PyCFunction)core_announce, METH_NOARGS, "set our sleeping flag, then fence"}, \
    {"unannounce", (PyCFunction)core_unannounce, METH_NOARGS, "clear our sleeping flag"},       \
    {"my_flags", (PyCFunction)core_my_flags, METH_NOARGS, NULL},                                \
    {"peer_flags", (PyCFunction)core_peer_flags, METH_NOARGS, NULL},                            \
    {"backlog", (PyCFunction)core_backlog, METH_NOARGS, NULL},                                  \
    {"set_closed", (PyCFunction)core_set_closed, METH_NOARGS, NULL},                            \
    {"release", (PyCFunction)core_release, METH_NOARGS, NULL},                                  \
    {"woken", (PyCFunction)core_woken, METH_O, "clear our sleeping flag, drain the doorbell"},  \
    {"wait", (PyCFunction)(void (*)(void))core_wait, METH_FASTCALL, NULL},                     \
    {"prepare_sleep", (PyCFunction)core_prepare_sleep, METH_O, "announce sleep, look again"},  \
    {"after_sleep", (PyCFunction)core_after_sleep, METH_O, "clear the flag, look again"}

static PyMethodDef writer_methods[] = {
    {"try_send", (PyCFunction)writer_try_send, METH_O, NULL},
    {"try_send_many", (PyCFunction)(void (*)(void))writer_try_send_many, METH_FASTCALL, NULL},
    {"spin", (PyCFunction)(void (*)(void))writer_spin, METH_FASTCALL, NULL},
    SHARED_METHODS,
    {NULL},
};

static PyMethodDef reader_methods[] = {
    {"try_receive", (PyCFunction)reader_try_receive, METH_NOARGS, NULL},
    {"try_receive_many", (PyCFunction)(void (*)(void))reader_try_receive_many, METH_FASTCALL, NULL},
    {"spin", (PyCFunction)(void (*)(void))reader_spin, METH_FASTCALL, NULL},
    SHARED_METHODS,
    {NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "multikernel.shm._native.Writer",
    .tp_doc = "The producer's hot path of one ring: Writer(buffer, offset, capacity, peer_bell_fd)",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)writer_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = writer_methods,
    .tp_getset = core_getset,
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "multikernel.shm._native.Reader",
    .tp_doc = "The consumer's hot path of one ring: Reader(buffer, offset, capacity, peer_bell_fd)",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = reader_methods,
    .tp_getset = core_getset,
};

static PyObject *native_init(PyObject *module, PyObject *args) {
    PyObject *corrupted, *large, *broken, *closed;
    if (!PyArg_ParseTuple(args, "OOOO", &corrupted, &large, &broken, &closed))
        return NULL;
    Py_INCREF(corrupted); Py_XSETREF(CorruptedError, corrupted);
    Py_INCREF(large); Py_XSETREF(TooLargeError, large);
    Py_INCREF(broken); Py_XSETREF(BrokenError, broken);
    Py_INCREF(closed); Py_XSETREF(ClosedError, closed);
    Py_RETURN_NONE;
}

/* -- broadcast streams -------------------------------------------------------------------------- */

#define STREAM_SLOT_RESERVE 16

/* stream_frames(stream, capacity, cursor, tail, max_frames)
 *     -> (pos, seq, bodies, dropped, bad, lapped)
 *
 * The copy loop of a stream reader (StreamReader.read in _stream.py has the rules and the rest):
 * copy the bodies of up to max_frames frames from `cursor` to `tail`, each header word read once
 * and checked (flags, length, within the published bytes and the data area), then load the
 * writer's `reserve`: the first `dropped` bodies started before `reserve - capacity` and may have
 * been overwritten while they were copied. `seq` is the last copied frame's sequence number,
 * `pos` where the reader is now, `bad` what was wrong with the frame at `pos` ("" if nothing),
 * `lapped` whether `pos` is before `reserve - capacity` (then `bad` was an overwrite in
 * progress, not garbage). `capacity` was checked at attach. */
static PyObject *stream_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "stream_frames takes 5 arguments");
        return NULL;
    }
    unsigned long long capacity = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long cursor = PyLong_AsUnsignedLongLong(args[2]);
    unsigned long long tail = PyLong_AsUnsignedLongLong(args[3]);
    Py_ssize_t max_frames = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (capacity < MIN_CAPACITY || capacity > MAX_CAPACITY || (capacity & (capacity - 1)) ||
        max_frames < 0 || max_frames > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "stream_frames: bad capacity or max_frames");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *bodies = NULL, *result = NULL;
    uint64_t *starts = NULL;
    if ((uint64_t)view.len < HEADER_SIZE + capacity) {
        PyErr_SetString(PyExc_ValueError, "stream_frames: the mapping is smaller than the stream");
        goto done;
    }
    starts = PyMem_Malloc(sizeof(uint64_t) * (size_t)(max_frames ? max_frames : 1));
    bodies = PyList_New(0);
    if (starts == NULL || bodies == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    volatile uint64_t *hdr = (volatile uint64_t *)view.buf;
    const unsigned char *data = (const unsigned char *)view.buf + HEADER_SIZE;
    uint64_t mask = capacity - 1, most = capacity / 2 - FRAME_HEADER;
    uint64_t pos = cursor, seq = 0;
    Py_ssize_t n = 0;
    char bad[160] = "";
    while (pos < tail && n < max_frames) {
        uint64_t off = pos & mask;
        uint64_t word = load64((volatile uint64_t *)(data + off));
        if (word >> 32) {
            if ((word >> 32) != FLAG_PADDING || off + FRAME_HEADER + (word & 0xFFFFFFFFull) != capacity) {
                snprintf(bad, sizeof bad, "bad frame header %#llx at %llu", (unsigned long long)word,
                         (unsigned long long)pos);
                break;
            }
            pos += capacity - off;
            continue;
        }
        uint64_t size = (word + 15) & ~(uint64_t)7;
        if (word < 8 || word > most || pos + size > tail || off + size > capacity) {
            snprintf(bad, sizeof bad, "frame length %llu at %llu", (unsigned long long)word,
                     (unsigned long long)pos);
            break;
        }
        seq = load64((volatile uint64_t *)(data + off + 8));
        PyObject *body = PyBytes_FromStringAndSize((const char *)data + off + 16, (Py_ssize_t)word - 8);
        if (body == NULL || PyList_Append(bodies, body) < 0) {
            Py_XDECREF(body);
            goto done;
        }
        Py_DECREF(body);
        starts[n++] = pos;
        pos += size;
    }
    uint64_t reserve = load64(&hdr[STREAM_SLOT_RESERVE]); /* after the copies */
    Py_ssize_t dropped = 0;
    int lapped = reserve > capacity && pos < reserve - capacity; /* `bad` was an overwrite */
    if (reserve > capacity)
        while (dropped < n && starts[dropped] < reserve - capacity)
            dropped++;
    result = Py_BuildValue("(KKOnsO)", (unsigned long long)pos, (unsigned long long)seq, bodies,
                           dropped, bad, lapped ? Py_True : Py_False);
done:
    Py_XDECREF(bodies);
    PyMem_Free(starts);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef module_methods[] = {
    {"init", native_init, METH_VARARGS,
     "init(corrupted, too_large, broken, closed): the error types the cores raise"},
    {"stream_frames", (PyCFunction)(void (*)(void))stream_frames, METH_FASTCALL,
     "a stream reader's copy loop (see _stream.py, StreamReader.read)"},
    {NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "multikernel.shm._native",
    .m_doc = "The ring's hot operations in C (see _pycore.py for the reference implementation).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&WriterType) < 0 || PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&WriterType);
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Writer", (PyObject *)&WriterType) < 0 ||
        PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
