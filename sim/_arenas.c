/* Python's small-object arenas on transparent huge pages (optional; switched on by sim/driver.py).
 *
 * A simulation of 100k peers holds ~1 GB of small Python objects, read in no order a cache or
 * a TLB could follow: on 4 kB pages nearly every read of a cold object also walks the page
 * tables. Python's allocator takes its 1 MiB arenas from the arena allocator one can set
 * (`PyObject_SetArenaAllocator`); `use_huge_pages()` sets one that carves them, in order, out
 * of 64 MiB regions aligned to 2 MiB and marked `MADV_HUGEPAGE`, so the kernel backs them with
 * huge pages where its THP setting allows (`madvise` or `always`). An arena is given back
 * with `munmap`, as Python's own allocator does (the kernel splits a huge page for it), so
 * arenas from either allocator can be freed by it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/mman.h>

#define HUGE_PAGE ((size_t)2 << 20)
#define REGION ((size_t)64 << 20)

static char *next_free, *region_end; /* what is left of the current region */
static PyObjectArenaAllocator python_s; /* the allocator before ours, for what ours cannot do */
static int in_use;

static int new_region(void) {
    char *p = mmap(NULL, REGION + HUGE_PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    char *start = (char *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (start > p)
        munmap(p, (size_t)(start - p));
    char *end = start + REGION;
    if (p + REGION + HUGE_PAGE > end)
        munmap(end, (size_t)(p + REGION + HUGE_PAGE - end));
    madvise(start, REGION, MADV_HUGEPAGE); /* (refused without THP: small pages, as before) */
    next_free = start;
    region_end = end;
    return 0;
}

static void *arena_alloc(void *ctx, size_t size) {
    (void)ctx;
    if (size > REGION || ((next_free == NULL || next_free + size > region_end) && new_region() < 0))
        return python_s.alloc(python_s.ctx, size);
    void *arena = next_free;
    next_free += size;
    return arena;
}

static void arena_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    munmap(ptr, size);
}

static PyObject *use_huge_pages(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    (void)self;
    if (!in_use) {
        PyObjectArenaAllocator mine = {NULL, arena_alloc, arena_free};
        PyObject_GetArenaAllocator(&python_s);
        PyObject_SetArenaAllocator(&mine);
        in_use = 1;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"use_huge_pages", use_huge_pages, METH_NOARGS,
     "From now on, take Python's object arenas from 2 MiB-aligned regions marked for "
     "transparent huge pages (idempotent; for the rest of the process)."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sim._arenas",
    "Python's object arenas on transparent huge pages (optional; see sim/driver.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__arenas(void) { return PyModule_Create(&module); }
