/* EventCalendar: the scheduler's timeline in C (the interface of `sim.scheduler.Calendar`).
 *
 * An event is (time, seq, fn, *args), ordered by (time, seq), which is unique per event: events
 * pop in exactly the order one `heapq` heap of the same tuples gives. The structure is the
 * Python `Calendar`'s: `per_s` buckets a second; the events of the bucket being run (and of
 * earlier ones, put there late) are a binary heap, those of the next `ring` buckets wait
 * unsorted in a ring of arrays indexed by bucket number, and later ones in a second heap.
 *
 * What C adds is where the memory traffic goes. A run pushes an event when it has just made it,
 * and pops it up to a second later. A tuple of Python objects made at the push is cold by then
 * (a 100k-peer run has ~1 GB of state): reading its time, its sequence number and a link number
 * and a time among its arguments cost a cache miss each, and freeing it unlinked it from the
 * cyclic collector's list, between neighbours as old and cold as it is. Here an event is one
 * 64-byte slot: its time and sequence number, and each of up to four arguments that is an int
 * (64-bit) or a float, are kept as C numbers, and `pop` makes the tuple anew (its numbers are
 * new objects, from memory just freed). Other arguments are held as references. The slots of a
 * bucket are one array, read in order when the run reaches it.
 *
 * The calendar numbers the events itself (`seq`), which lets it handle the driver's node wakes
 * (`wakes`) without going back to Python for the ones with nothing to do; see `settle`. Knowing
 * which node each coming event is for (`warm`), it also starts fetching that node's memory
 * while the event before it runs; see `warm_next`.
 *
 * Optional: bench/build_compiled.sh builds it into the compiled copy; without it the scheduler
 * uses the Python `Calendar` (tests/sim/test_calendar.py checks both against each other).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <structmember.h>

#define NEVER (1LL << 62) /* the bucket of times at or beyond 1e15 s (and infinity) */
#define MAXA 4              /* arguments kept in the slot; more go in a tuple */
#define MAX_BY_LINK 4       /* callbacks `warm` can be told name a link */
#define MAX_LINES 16        /* cache lines of a node `warm` fetches, at most */

enum { OBJ, INT, FLOAT };

typedef union {
    PyObject *o;
    long long i;
    double d;
} Arg;

typedef struct {
    double time;
    unsigned long long seq;
    PyObject *fn;
    signed char n;            /* arguments in `arg`, or -1: arg[0].o is a tuple of them all */
    unsigned char kind[MAXA]; /* OBJ (a reference), INT or FLOAT */
    Arg arg[MAXA];
} Slot;
_Static_assert(sizeof(Slot) == 64, "an event is one cache line");

typedef struct {
    Slot *s;
    Py_ssize_t n, cap;
} Slots;

typedef struct {
    double armed; /* the node's live wake is for this time (inf: none, NaN: the node is gone) */
    double due;   /* the node's first deadline, as `arm` was last told */
} Wake;

typedef struct {
    PyObject_HEAD
    double per_s;
    long long ring;    /* buckets in the ring (a power of two) */
    long long current; /* the bucket being run (-1: none yet) */
    Slots heap;        /* events of `current` and earlier: a binary heap */
    Slots *ring_of;    /* bucket b's events at b & (ring - 1), for current < b < current + ring */
    Py_ssize_t in_ring;
    Slots far;         /* events of later buckets: a binary heap */
    unsigned long long seq; /* the last event's sequence number (the first is 1) */
    PyObject *wake;    /* the wakes' callback (NULL: no wakes), see `settle` */
    Py_ssize_t nodes;  /* wakes are for nodes 0 .. nodes - 1 */
    Wake *wakes;       /* node i's, side by side: a node's wake reads one line, not two */
    PyObject *objs;    /* the node objects by index (NULL: no warming), see `warm_next` */
    Py_buffer owner;   /* link -> its node's index (int32), for events of `by_link` */
    PyObject *by_link[MAX_BY_LINK]; /* callbacks whose first argument is a link */
    int n_by_link;
    int lines;         /* cache lines of a node object to fetch */
} EventCalendar;

static inline int before(const Slot *a, const Slot *b) {
    return a->time < b->time || (a->time == b->time && a->seq < b->seq);
}

static inline long long bucket_of(const EventCalendar *c, double t) {
    return t < 1e15 ? (long long)(t * c->per_s) : NEVER; /* as `int(t * per_s)` in Python */
}

static int reserve(Slots *v, Py_ssize_t more) {
    if (v->n + more <= v->cap)
        return 0;
    Py_ssize_t cap = v->cap ? v->cap : 16;
    while (cap < v->n + more)
        cap *= 2;
    Slot *s = PyMem_Realloc(v->s, (size_t)cap * sizeof(Slot));
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    v->s = s;
    v->cap = cap;
    return 0;
}

static void release(Slots *v) {
    PyMem_Free(v->s);
    v->s = NULL;
    v->n = v->cap = 0;
}

static void sift_up(Slot *s, Py_ssize_t i) {
    Slot x = s[i];
    while (i > 0) {
        Py_ssize_t parent = (i - 1) >> 1;
        if (!before(&x, &s[parent]))
            break;
        s[i] = s[parent];
        i = parent;
    }
    s[i] = x;
}

static void sift_down(Slot *s, Py_ssize_t n, Py_ssize_t i) {
    Slot x = s[i];
    for (;;) {
        Py_ssize_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && before(&s[child + 1], &s[child]))
            child++;
        if (!before(&s[child], &x))
            break;
        s[i] = s[child];
        i = child;
    }
    s[i] = x;
}

static Slot heap_take(Slots *h) {
    Slot top = h->s[0];
    if (--h->n > 0) {
        h->s[0] = h->s[h->n];
        sift_down(h->s, h->n, 0);
    }
    return top;
}

/* Keep argument `x` in `*arg`: as a C number if it is an int that fits 64 bits or a float,
 * else as a reference (not taken here). */
static unsigned char pack(PyObject *x, Arg *arg) {
    if (PyFloat_CheckExact(x)) {
        arg->d = PyFloat_AS_DOUBLE(x);
        return FLOAT;
    }
    if (PyLong_CheckExact(x)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
        if (!overflow && !(v == -1 && PyErr_Occurred())) {
            arg->i = v;
            return INT;
        }
        PyErr_Clear();
    }
    arg->o = x;
    return OBJ;
}

static PyObject *unpack(unsigned char kind, Arg arg) {
    switch (kind) {
    case INT:
        return PyLong_FromLongLong(arg.i);
    case FLOAT:
        return PyFloat_FromDouble(arg.d);
    default:
        return Py_NewRef(arg.o);
    }
}

/* The event as a new tuple (time, seq, fn, *args); the slot keeps its references. */
static PyObject *make_entry(const Slot *s) {
    PyObject *rest = s->n < 0 ? s->arg[0].o : NULL;
    Py_ssize_t na = rest ? PyTuple_GET_SIZE(rest) : s->n;
    PyObject *e = PyTuple_New(3 + na);
    if (e == NULL)
        return NULL;
    PyObject *x;
    if ((x = PyFloat_FromDouble(s->time)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(e, 0, x);
    if ((x = PyLong_FromUnsignedLongLong(s->seq)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(e, 1, x);
    PyTuple_SET_ITEM(e, 2, Py_NewRef(s->fn));
    for (Py_ssize_t j = 0; j < na; j++) {
        x = rest ? Py_NewRef(PyTuple_GET_ITEM(rest, j)) : unpack(s->kind[j], s->arg[j]);
        if (x == NULL)
            goto fail;
        PyTuple_SET_ITEM(e, 3 + j, x);
    }
    return e;
fail:
    Py_DECREF(e); /* (unset items are NULL, which a tuple's dealloc skips) */
    return NULL;
}

/* Drop the slot's references. */
static void release_slot(Slot *s) {
    Py_DECREF(s->fn);
    if (s->n < 0) {
        Py_DECREF(s->arg[0].o);
        return;
    }
    for (int j = 0; j < s->n; j++)
        if (s->kind[j] == OBJ)
            Py_DECREF(s->arg[j].o);
}

/* Put a copy of `slot` where its time goes (its references are not taken here); -1 if out of
 * memory. */
static int place(EventCalendar *c, const Slot *slot) {
    long long b = bucket_of(c, slot->time);
    Slots *v = b <= c->current ? &c->heap
               : b - c->current < c->ring ? &c->ring_of[b & (c->ring - 1)]
               : &c->far;
    if (reserve(v, 1) < 0)
        return -1;
    v->s[v->n++] = *slot;
    if (v == &c->heap || v == &c->far)
        sift_up(v->s, v->n - 1);
    else
        c->in_ring++;
    return 0;
}

static PyObject *cal_push(EventCalendar *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "push(time, fn, *args)");
        return NULL;
    }
    Slot slot;
    slot.time = PyFloat_AsDouble(args[0]);
    if (slot.time == -1.0 && PyErr_Occurred())
        return NULL;
    if (slot.time != slot.time) {
        PyErr_SetString(PyExc_ValueError, "an event's time is NaN");
        return NULL;
    }
    slot.fn = args[1];
    Py_ssize_t na = nargs - 2;
    if (na <= MAXA) {
        slot.n = (signed char)na;
        for (Py_ssize_t j = 0; j < na; j++)
            slot.kind[j] = pack(args[2 + j], &slot.arg[j]);
    } else {
        slot.n = -1;
        if ((slot.arg[0].o = PyTuple_New(na)) == NULL)
            return NULL;
        for (Py_ssize_t j = 0; j < na; j++)
            PyTuple_SET_ITEM(slot.arg[0].o, j, Py_NewRef(args[2 + j]));
    }
    slot.seq = c->seq + 1;
    if (place(c, &slot) < 0) {
        if (slot.n < 0)
            Py_DECREF(slot.arg[0].o);
        return NULL;
    }
    c->seq++;
    Py_INCREF(slot.fn);
    for (int j = 0; j < slot.n; j++)
        if (slot.kind[j] == OBJ)
            Py_INCREF(slot.arg[j].o);
    Py_RETURN_NONE;
}

/* The heap is empty: make the next bucket holding events current. 1 if there is one, 0 if
 * nothing is pending, -1 (an exception set) if out of memory. */
static int advance(EventCalendar *c) {
    long long b_ring = LLONG_MAX, b_far = LLONG_MAX, mask = c->ring - 1;
    if (c->in_ring) {
        long long b = c->current + 1;
        while (c->ring_of[b & mask].n == 0) /* within `ring` steps: the ring holds one */
            b++;
        b_ring = b;
    }
    if (c->far.n)
        b_far = bucket_of(c, c->far.s[0].time);
    if (b_ring == LLONG_MAX && b_far == LLONG_MAX)
        return 0;
    long long next = b_ring < b_far ? b_ring : b_far;
    Slots *h = &c->heap;
    if (b_ring == next) {
        /* (A bucket may have entries in both: put far, then reached by the ring.) */
        Slots *r = &c->ring_of[next & mask], spent = *h;
        c->in_ring -= r->n;
        *h = *r; /* (the heap is empty: it takes the bucket's array as it is) */
        *r = (Slots){NULL, 0, 0};
        release(&spent); /* (a bucket's array is not kept: ~1 s of them would hold their peak) */
    }
    while (c->far.n && bucket_of(c, c->far.s[0].time) <= next) {
        if (reserve(h, 1) < 0)
            break;
        h->s[h->n++] = heap_take(&c->far);
    }
    c->current = next;
    for (Py_ssize_t i = h->n / 2 - 1; i >= 0; i--)
        sift_down(h->s, h->n, i);
    return PyErr_Occurred() ? -1 : 1;
}

/* The first entry's slot in the heap, advancing as needed; NULL if nothing is pending (or on
 * error, with an exception set). */
static Slot *first_slot(EventCalendar *c) {
    while (c->heap.n == 0) {
        int r = advance(c);
        if (r <= 0)
            return NULL;
    }
    return &c->heap.s[0];
}

/* Remove the heap's first event and return it as a tuple (nothing removed if that fails). */
static PyObject *take_first(EventCalendar *c) {
    PyObject *e = make_entry(&c->heap.s[0]);
    if (e != NULL) {
        Slot s = heap_take(&c->heap);
        release_slot(&s);
    }
    return e;
}

/* -- node wakes ----------------------------------------------------------------------------
 *
 * The driver keeps at most one live wake per node: the event `wake(i, when)` at node i's first
 * deadline `when` (or now, if that has passed). After each of node i's turns it tells the
 * calendar the node's first deadline (`arm`), which schedules a wake for it unless one is set no
 * later. A deadline that moves later leaves the wake where it was; an earlier one makes the wake
 * set before stale. Most wakes thus have nothing to do: three in four of those that are not
 * stale come after the node's deadline moved later (a peer's "repair" or "play" time, when the
 * chunk came meanwhile). They are dealt with here, when they come up, without a call to Python:
 * a stale one (or one of a node gone, `disarm`) is dropped, and one whose node's deadline is
 * later is set again for that deadline, numbered then, exactly as the driver did it. Only wakes
 * with something due are handed out.
 */

static inline int is_wake(const EventCalendar *c, const Slot *s) {
    return s->fn == c->wake && c->wake != NULL && s->n == 2 && s->kind[0] == INT &&
           s->kind[1] == FLOAT && s->arg[0].i >= 0 && s->arg[0].i < c->nodes;
}

/* Node i's wake for deadline `t`, at `t` or `now` if later. */
static int push_wake(EventCalendar *c, long long i, double t, double now) {
    Slot s;
    s.time = t > now ? t : now;
    s.seq = c->seq + 1;
    s.fn = c->wake;
    s.n = 2;
    s.kind[0] = INT;
    s.arg[0].i = i;
    s.kind[1] = FLOAT;
    s.arg[1].d = t;
    if (place(c, &s) < 0)
        return -1;
    c->seq++;
    Py_INCREF(s.fn);
    c->wakes[i].armed = t;
    return 0;
}

/* The first event to hand out, if its time is at most `until`, after dealing with the wakes
 * before it that have nothing to do; NULL if there is none (with an exception set if out of
 * memory). */
static Slot *settle(EventCalendar *c, double until) {
    for (;;) {
        Slot *s = first_slot(c);
        if (s == NULL || s->time > until)
            return NULL;
        if (!is_wake(c, s))
            return s;
        long long i = s->arg[0].i;
        double when = s->arg[1].d, now = s->time;
        if (c->wakes[i].armed == when && !(c->wakes[i].due > now))
            return s; /* something is due: the driver runs the node's timers */
        Slot spent = heap_take(&c->heap);
        release_slot(&spent);
        if (c->wakes[i].armed == when) { /* the deadline moved later: wake the node then */
            c->wakes[i].armed = INFINITY;
            if (c->wakes[i].due < INFINITY && push_wake(c, i, c->wakes[i].due, now) < 0)
                return NULL;
        }
    }
}

/* -- warming ------------------------------------------------------------------------------
 *
 * In a 100k-peer run each event's node is cold: the driver's first reads of it (`owner[link]`,
 * `nodes[i]`, then the node's own fields) each wait ~100 ns for memory, one after the other.
 * Told where the nodes are (`warm`), the calendar asks the CPU for them ahead, by prefetches
 * that never block. When an event is handed out, the one to follow it is the heap's root, and
 * those after that are among the root's children and grandchildren (slots 1-6); so before the
 * driver runs an event, the calendar starts, in three steps a turn apart,
 *   - for the next six (heap slots 1-6): the event's `owner` entry (link events) or its item
 *     of `nodes` (wakes);
 *   - for the next two (slots 1-2, the ones to follow the root): the `nodes` item, from the
 *     `owner` entry asked for a turn before;
 *   - for the next (the root): the node object's first `lines` cache lines, and its wake
 *     (`wakes[i]`, which the driver's `arm` reads after the event).
 * Reading what was asked for a turn before rarely waits, and the fetches overlap the event
 * being run. Events of the following bucket (not yet a heap) are not warmed. Nothing depends on
 * it but speed: a guess that turns out wrong (an event pushed ahead of them) costs a fetch.
 */

enum { NAMES_NONE, NAMES_NODE, NAMES_LINK };

/* What event `s` names first: a node (a wake), a link (a callback of `by_link`), or neither. */
static int names(const EventCalendar *c, const Slot *s) {
    if (s->n < 1 || s->kind[0] != INT)
        return NAMES_NONE;
    if (s->fn == c->wake)
        return NAMES_NODE;
    for (int k = 0; k < c->n_by_link; k++)
        if (s->fn == c->by_link[k])
            return NAMES_LINK;
    return NAMES_NONE;
}

static inline int has_link(const EventCalendar *c, long long link) {
    return link >= 0 && link < c->owner.len / 4;
}

/* The index of the node event `s` is for; -1 if not known. May read `owner` (a load). */
static long long node_index(const EventCalendar *c, const Slot *s) {
    switch (names(c, s)) {
    case NAMES_NODE:
        return s->arg[0].i;
    case NAMES_LINK:
        return has_link(c, s->arg[0].i) ? ((const int32_t *)c->owner.buf)[s->arg[0].i] : -1;
    default:
        return -1;
    }
}

static inline void warm_item_of(const EventCalendar *c, long long i) {
    if (i >= 0 && i < PyList_GET_SIZE(c->objs))
        __builtin_prefetch(&PyList_GET_ITEM(c->objs, i));
}

/* Step 1: prefetch what `node_index` reads for `s` (its owner entry; for a wake, its item). */
static void warm_index(const EventCalendar *c, const Slot *s) {
    switch (names(c, s)) {
    case NAMES_NODE:
        warm_item_of(c, s->arg[0].i);
        break;
    case NAMES_LINK:
        if (has_link(c, s->arg[0].i))
            __builtin_prefetch((const int32_t *)c->owner.buf + s->arg[0].i);
        break;
    }
}

/* Step 2: prefetch the item of `nodes` for `s`. */
static void warm_item(const EventCalendar *c, const Slot *s) {
    warm_item_of(c, node_index(c, s));
}

/* Step 3: prefetch the node object for `s`, and its wake (the driver arms it after the event). */
static void warm_node(const EventCalendar *c, const Slot *s) {
    long long i = node_index(c, s);
    if (i >= 0 && i < c->nodes)
        __builtin_prefetch(&c->wakes[i]);
    if (i < 0 || i >= PyList_GET_SIZE(c->objs))
        return;
    const char *o = (const char *)PyList_GET_ITEM(c->objs, i);
    for (int l = 0; l < c->lines; l++)
        __builtin_prefetch(o + 64 * l);
}

static void warm_next(const EventCalendar *c) {
    const Slots *h = &c->heap;
    if (c->objs == NULL || h->n == 0)
        return;
    for (Py_ssize_t j = 1; j < 7 && j < h->n; j++)
        warm_index(c, &h->s[j]);
    for (Py_ssize_t j = 1; j < 3 && j < h->n; j++)
        warm_item(c, &h->s[j]);
    warm_node(c, &h->s[0]);
}

static void unwarm(EventCalendar *c) {
    Py_CLEAR(c->objs);
    if (c->owner.obj != NULL)
        PyBuffer_Release(&c->owner);
    for (int k = 0; k < c->n_by_link; k++)
        Py_CLEAR(c->by_link[k]);
    c->n_by_link = 0;
}

static PyObject *cal_warm(EventCalendar *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 3 + MAX_BY_LINK || !PyList_CheckExact(args[0])) {
        PyErr_Format(PyExc_TypeError, "warm(nodes: list, owner, size, *fns) with up to %d fns",
                     MAX_BY_LINK);
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer owner;
    if (PyObject_GetBuffer(args[1], &owner, PyBUF_FORMAT) < 0)
        return NULL;
    if (owner.itemsize != 4 || owner.format == NULL || strcmp(owner.format, "i") != 0) {
        PyBuffer_Release(&owner);
        PyErr_SetString(PyExc_TypeError, "warm: owner must hold int32 items");
        return NULL;
    }
    unwarm(c);
    c->owner = owner;
    c->objs = Py_NewRef(args[0]);
    for (Py_ssize_t k = 3; k < nargs; k++)
        c->by_link[c->n_by_link++] = Py_NewRef(args[k]);
    /* (A node's object need not start on a line: one more.) */
    long long lines = size > 0 ? (size + 63) / 64 + 1 : 0;
    c->lines = lines < MAX_LINES ? (int)lines : MAX_LINES;
    Py_RETURN_NONE;
}

/* Remove and return the first event to hand out (see `settle`); a wake handed out is spent. */
static PyObject *take_settled(EventCalendar *c) {
    Slot *s = &c->heap.s[0];
    if (is_wake(c, s))
        c->wakes[s->arg[0].i].armed = INFINITY;
    PyObject *e = take_first(c);
    warm_next(c);
    return e;
}

static PyObject *cal_pop(EventCalendar *c, PyObject *Py_UNUSED(ignored)) {
    if (settle(c, INFINITY) == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_IndexError, "pop from an empty EventCalendar");
        return NULL;
    }
    return take_settled(c);
}

static PyObject *cal_pop_until(EventCalendar *c, PyObject *arg) {
    double until = PyFloat_AsDouble(arg);
    if (until == -1.0 && PyErr_Occurred())
        return NULL;
    if (settle(c, until) == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return take_settled(c);
}

static int node_arg(const EventCalendar *c, PyObject *x, Py_ssize_t *i) {
    *i = PyLong_AsSsize_t(x);
    if (*i == -1 && PyErr_Occurred())
        return -1;
    if (*i < 0 || *i >= c->nodes) {
        PyErr_Format(PyExc_IndexError, "node %zd is not one of the %zd with wakes", *i, c->nodes);
        return -1;
    }
    return 0;
}

static PyObject *cal_wakes(EventCalendar *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "wakes(nodes, fn)");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[0]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || c->wake != NULL) {
        PyErr_SetString(PyExc_ValueError, "wakes are set once, for a count of nodes >= 0");
        return NULL;
    }
    Wake *wakes = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Wake));
    if (wakes == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++)
        wakes[i].armed = wakes[i].due = INFINITY;
    c->wakes = wakes;
    c->nodes = n;
    c->wake = Py_NewRef(args[1]);
    Py_RETURN_NONE;
}

static PyObject *cal_arm(EventCalendar *c, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t i;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "arm(node, deadline, now)");
        return NULL;
    }
    if (node_arg(c, args[0], &i) < 0)
        return NULL;
    double t = PyFloat_AsDouble(args[1]), now = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (t != t) {
        PyErr_SetString(PyExc_ValueError, "a deadline is NaN");
        return NULL;
    }
    c->wakes[i].due = t;
    if (t < c->wakes[i].armed && push_wake(c, i, t, now) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *cal_disarm(EventCalendar *c, PyObject *arg) {
    Py_ssize_t i;
    if (node_arg(c, arg, &i) < 0)
        return NULL;
    c->wakes[i].armed = NAN; /* equal to no wake's time, and later than no deadline */
    Py_RETURN_NONE;
}

static PyObject *cal_revive(EventCalendar *c, PyObject *arg) {
    Py_ssize_t i;
    if (node_arg(c, arg, &i) < 0)
        return NULL;
    c->wakes[i].armed = c->wakes[i].due = INFINITY;
    Py_RETURN_NONE;
}

static PyObject *cal_first(EventCalendar *c, PyObject *Py_UNUSED(ignored)) {
    Slot *first = first_slot(c);
    if (first == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return make_entry(first);
}

static int add_all(PyObject *out, const Slots *v) {
    for (Py_ssize_t i = 0; i < v->n; i++) {
        PyObject *e = make_entry(&v->s[i]);
        if (e == NULL || PyList_Append(out, e) < 0) {
            Py_XDECREF(e);
            return -1;
        }
        Py_DECREF(e);
    }
    return 0;
}

static PyObject *cal_entries(EventCalendar *c, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    int bad = add_all(out, &c->heap) < 0 || add_all(out, &c->far) < 0;
    for (long long i = 0; !bad && i < c->ring; i++)
        bad = add_all(out, &c->ring_of[i]) < 0;
    if (bad) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static Py_ssize_t cal_len(EventCalendar *c) { return c->heap.n + c->in_ring + c->far.n; }

static int visit_all(const Slots *v, visitproc visit, void *arg) {
    for (Py_ssize_t i = 0; i < v->n; i++) {
        const Slot *s = &v->s[i];
        Py_VISIT(s->fn);
        if (s->n < 0)
            Py_VISIT(s->arg[0].o);
        for (int j = 0; j < s->n; j++)
            if (s->kind[j] == OBJ)
                Py_VISIT(s->arg[j].o);
    }
    return 0;
}

static int cal_traverse(EventCalendar *c, visitproc visit, void *arg) {
    Py_VISIT(c->wake);
    Py_VISIT(c->objs);
    Py_VISIT(c->owner.obj);
    for (int k = 0; k < c->n_by_link; k++)
        Py_VISIT(c->by_link[k]);
    int r = visit_all(&c->heap, visit, arg);
    if (r == 0)
        r = visit_all(&c->far, visit, arg);
    for (long long i = 0; r == 0 && c->ring_of != NULL && i < c->ring; i++)
        r = visit_all(&c->ring_of[i], visit, arg);
    return r;
}

static void drop_all(Slots *v) {
    Py_ssize_t n = v->n;
    Slot *s = v->s;
    v->s = NULL;
    v->n = v->cap = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        release_slot(&s[i]);
    PyMem_Free(s);
}

static int cal_clear(EventCalendar *c) {
    drop_all(&c->heap);
    drop_all(&c->far);
    for (long long i = 0; c->ring_of != NULL && i < c->ring; i++)
        drop_all(&c->ring_of[i]);
    c->in_ring = 0;
    Py_CLEAR(c->wake);
    unwarm(c);
    return 0;
}

static void cal_dealloc(EventCalendar *c) {
    PyObject_GC_UnTrack(c);
    cal_clear(c);
    PyMem_Free(c->ring_of);
    PyMem_Free(c->wakes);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int cal_init(EventCalendar *c, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"per_s", "ring", NULL};
    double per_s;
    long long ring;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dL", kwlist, &per_s, &ring))
        return -1;
    if (!(per_s > 0) || ring < 1 || ring > (1LL << 24) || (ring & (ring - 1))) {
        PyErr_SetString(PyExc_ValueError,
                        "per_s must be positive and ring a power of two up to 2**24");
        return -1;
    }
    if (c->ring_of != NULL) {
        PyErr_SetString(PyExc_TypeError, "an EventCalendar is initialised once");
        return -1;
    }
    c->ring_of = PyMem_Calloc((size_t)ring, sizeof(Slots));
    if (c->ring_of == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    c->per_s = per_s;
    c->ring = ring;
    c->current = -1;
    return 0;
}

static PyMethodDef cal_methods[] = {
    {"push", (PyCFunction)(void (*)(void))cal_push, METH_FASTCALL,
     "push(time, fn, *args): add an event, numbered one more than the last (`seq`)."},
    {"pop", (PyCFunction)cal_pop, METH_NOARGS,
     "Remove and return the first event (wakes with nothing to do are dealt with first)."},
    {"pop_until", (PyCFunction)cal_pop_until, METH_O,
     "Remove and return the first event if its time is at most the argument, else None."},
    {"first", (PyCFunction)cal_first, METH_NOARGS,
     "The first event held, or None if empty (it may be a wake with nothing to do)."},
    {"wakes", (PyCFunction)(void (*)(void))cal_wakes, METH_FASTCALL,
     "wakes(nodes, fn): handle the wakes fn(i, when) of nodes 0 .. nodes - 1 (see the module)."},
    {"arm", (PyCFunction)(void (*)(void))cal_arm, METH_FASTCALL,
     "arm(i, t, now): node i's first deadline is t (inf: none); wake it then."},
    {"disarm", (PyCFunction)cal_disarm, METH_O, "disarm(i): node i is gone; no wake of it runs."},
    {"revive", (PyCFunction)cal_revive, METH_O, "revive(i): node i starts anew, no wake set."},
    {"warm", (PyCFunction)(void (*)(void))cal_warm, METH_FASTCALL,
     "warm(nodes, owner, size, *fns): fetch ahead the node object (`size` bytes) each coming "
     "event is for: nodes[i] for a wake, nodes[owner[link]] for fns(link, ...) (see the "
     "module). Call again whenever `owner` is replaced."},
    {"entries", (PyCFunction)cal_entries, METH_NOARGS, "The events held, in no order."},
    {NULL},
};

static PyMemberDef cal_members[] = {
    {"seq", T_ULONGLONG, offsetof(EventCalendar, seq), READONLY,
     "The last event's sequence number (0: none yet)."},
    {NULL},
};

static PySequenceMethods cal_as_sequence = {.sq_length = (lenfunc)cal_len};

static PyTypeObject EventCalendarType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._calendar.EventCalendar",
    .tp_doc = "EventCalendar(per_s, ring): events (time, seq, fn, *args) in (time, seq) order, held in C.",
    .tp_basicsize = sizeof(EventCalendar),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)cal_init,
    .tp_dealloc = (destructor)cal_dealloc,
    .tp_traverse = (traverseproc)cal_traverse,
    .tp_clear = (inquiry)cal_clear,
    .tp_methods = cal_methods,
    .tp_members = cal_members,
    .tp_as_sequence = &cal_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sim._calendar",
    "The scheduler's event calendar with its keys in C (optional; see sim/scheduler.py).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__calendar(void) {
    if (PyType_Ready(&EventCalendarType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EventCalendarType);
    if (PyModule_AddObject(m, "EventCalendar", (PyObject *)&EventCalendarType) < 0) {
        Py_DECREF(&EventCalendarType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
