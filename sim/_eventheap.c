/* EventHeap: the scheduler's current-bucket heap, with its keys in C.
 *
 * An entry is a tuple (time, seq, fn, *args), as in sim/scheduler.py; it is ordered by
 * (time, seq), which is unique per entry, so the pop order is the one `heapq` gives for the same
 * tuples. `heapq` compares two tuples through Python's rich comparison (about 150 instructions a
 * comparison, a dozen comparisons a pop); here each slot keeps its (time, seq) as C numbers next
 * to the entry, and a comparison is two machine compares.
 *
 * Optional: bench/build_compiled.sh builds it into the compiled copy; without it the scheduler
 * uses `sim.scheduler.ListHeap` (heapq), with the same interface and order
 * (tests/sim/test_eventheap.py checks both against each other).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    double time;
    unsigned long long seq;
    PyObject *entry;
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    Py_ssize_t n, cap;
} EventHeap;

static inline int before(const Slot *a, const Slot *b) {
    return a->time < b->time || (a->time == b->time && a->seq < b->seq);
}

/* The entry's key, or -1 with an exception set if it is not (number, int, ...). */
static int key_of(PyObject *entry, Slot *slot) {
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 3) {
        PyErr_SetString(PyExc_TypeError, "an event is a tuple (time, seq, fn, *args)");
        return -1;
    }
    double t = PyFloat_AsDouble(PyTuple_GET_ITEM(entry, 0));
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (t != t) {
        PyErr_SetString(PyExc_ValueError, "an event's time is NaN");
        return -1;
    }
    unsigned long long seq = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 1));
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    slot->time = t;
    slot->seq = seq;
    slot->entry = entry;
    return 0;
}

static int reserve(EventHeap *h, Py_ssize_t more) {
    if (h->n + more <= h->cap)
        return 0;
    Py_ssize_t cap = h->cap ? h->cap : 64;
    while (cap < h->n + more)
        cap *= 2;
    Slot *s = PyMem_Realloc(h->slots, (size_t)cap * sizeof(Slot));
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    h->slots = s;
    h->cap = cap;
    return 0;
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

static PyObject *heap_push(EventHeap *h, PyObject *entry) {
    Slot slot;
    if (key_of(entry, &slot) < 0 || reserve(h, 1) < 0)
        return NULL;
    Py_INCREF(entry);
    h->slots[h->n] = slot;
    sift_up(h->slots, h->n++);
    Py_RETURN_NONE;
}

static PyObject *heap_pop(EventHeap *h, PyObject *Py_UNUSED(ignored)) {
    if (h->n == 0) {
        PyErr_SetString(PyExc_IndexError, "pop from an empty EventHeap");
        return NULL;
    }
    PyObject *entry = h->slots[0].entry; /* the heap's reference passes to the caller */
    if (--h->n > 0) {
        h->slots[0] = h->slots[h->n];
        sift_down(h->slots, h->n, 0);
    }
    return entry;
}

static PyObject *heap_pop_until(EventHeap *h, PyObject *arg) {
    double until = PyFloat_AsDouble(arg);
    if (until == -1.0 && PyErr_Occurred())
        return NULL;
    if (h->n == 0 || h->slots[0].time > until)
        Py_RETURN_NONE;
    return heap_pop(h, NULL);
}

static PyObject *heap_first(EventHeap *h, PyObject *Py_UNUSED(ignored)) {
    if (h->n == 0)
        Py_RETURN_NONE;
    return Py_NewRef(h->slots[0].entry);
}

/* Add every entry of a list, then restore the heap (Floyd: O(n) for a bucket's worth). */
static PyObject *heap_extend(EventHeap *h, PyObject *entries) {
    if (!PyList_Check(entries)) {
        PyErr_SetString(PyExc_TypeError, "extend() takes a list of events");
        return NULL;
    }
    Py_ssize_t m = PyList_GET_SIZE(entries);
    if (reserve(h, m) < 0)
        return NULL;
    Py_ssize_t n0 = h->n;
    for (Py_ssize_t j = 0; j < m; j++) {
        PyObject *entry = PyList_GET_ITEM(entries, j);
        if (key_of(entry, &h->slots[h->n]) < 0) {
            while (h->n > n0) /* nothing half-added */
                Py_DECREF(h->slots[--h->n].entry);
            return NULL;
        }
        Py_INCREF(entry);
        h->n++;
    }
    for (Py_ssize_t i = h->n / 2 - 1; i >= 0; i--)
        sift_down(h->slots, h->n, i);
    Py_RETURN_NONE;
}

static PyObject *heap_entries(EventHeap *h, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(h->n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < h->n; i++)
        PyList_SET_ITEM(out, i, Py_NewRef(h->slots[i].entry));
    return out;
}

static Py_ssize_t heap_len(EventHeap *h) { return h->n; }

static int heap_traverse(EventHeap *h, visitproc visit, void *arg) {
    for (Py_ssize_t i = 0; i < h->n; i++)
        Py_VISIT(h->slots[i].entry);
    return 0;
}

static int heap_clear(EventHeap *h) {
    Py_ssize_t n = h->n;
    h->n = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(h->slots[i].entry);
    return 0;
}

static void heap_dealloc(EventHeap *h) {
    PyObject_GC_UnTrack(h);
    heap_clear(h);
    PyMem_Free(h->slots);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyMethodDef heap_methods[] = {
    {"push", (PyCFunction)heap_push, METH_O, "Add an event tuple (time, seq, fn, *args)."},
    {"pop", (PyCFunction)heap_pop, METH_NOARGS, "Remove and return the first event."},
    {"pop_until", (PyCFunction)heap_pop_until, METH_O,
     "Remove and return the first event if its time is at most the argument, else None."},
    {"first", (PyCFunction)heap_first, METH_NOARGS, "The first event, or None if empty."},
    {"extend", (PyCFunction)heap_extend, METH_O, "Add a list of events."},
    {"entries", (PyCFunction)heap_entries, METH_NOARGS, "The events held, in no order."},
    {NULL},
};

static PySequenceMethods heap_as_sequence = {.sq_length = (lenfunc)heap_len};

static PyTypeObject EventHeapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._eventheap.EventHeap",
    .tp_doc = "A heap of event tuples ordered by (time, seq), keys held in C.",
    .tp_basicsize = sizeof(EventHeap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)heap_dealloc,
    .tp_traverse = (traverseproc)heap_traverse,
    .tp_clear = (inquiry)heap_clear,
    .tp_methods = heap_methods,
    .tp_as_sequence = &heap_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sim._eventheap",
    "The scheduler's event heap with its keys in C (optional; see sim/scheduler.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__eventheap(void) {
    if (PyType_Ready(&EventHeapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EventHeapType);
    if (PyModule_AddObject(m, "EventHeap", (PyObject *)&EventHeapType) < 0) {
        Py_DECREF(&EventHeapType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
