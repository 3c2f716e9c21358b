/* Table lookups of vq.TableDecoder in C: the decode of plain product-quantizer codes.

   take_rows(table, codes, out, n_bytes, row_bytes): for every vector i and code byte j,
       out[i, j] = table[j * 256 + codes[i, j]]       (rows of row_bytes bytes, copied)
   table: (n_bytes * 256, row) float32, codes: (N, n_bytes) uint8, out: (N, n_bytes * row) float32,
   all C-contiguous (vq.TableDecoder passes numpy arrays; any writable buffer works for out).

   Why C: numpy's `take` spends ~0.6 ns a lookup on its index array and the index array itself
   ~0.35 ns more (the code byte written into an intp), so the default preset's 40 lookups a vector
   at D = 80 stayed at ~6x the paper's decoder; this loop reads eight code bytes at once and copies
   each row with one move (benchmarks/quant_frontier.py prints both paths in one run). A copy, no
   arithmetic: the floats are FAISS's sa_decode's bit for bit (tests/test_vq.py). setup.py builds
   it where a C compiler is (optional: without one vq.py falls back to numpy's take). The GIL is
   released while it copies. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER) && !defined(restrict)
#define restrict __restrict  /* MSVC's C before C11 */
#endif

/* one vector's rows: the byte-at-a-time body; ROW is a constant in the callers below, so each
   memcpy compiles to one move */
#define TAKE_ONE(ROW)                                                              \
    for (Py_ssize_t j = 0; j < n_bytes; j++) {                                     \
        memcpy(o + j * (ROW), t + ((size_t)j * 256 + c[j]) * (ROW), (ROW));         \
    }

/* 8-byte rows (PQ codes of 2-dim sub-vectors, the default preset): eight code bytes a load, the
   eight rows loaded before any is stored (so the compiler need not order a load after a store:
   `restrict`), a 64-bit move each. Byte k of the word is code byte j + k on a little-endian
   machine; a big-endian one takes the byte loop. ~1.4x the byte loop at 16 code bytes a vector */
static void take_fixed8(const uint8_t *restrict table, const uint8_t *restrict codes, uint8_t *restrict out,
                        Py_ssize_t n, Py_ssize_t n_bytes) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *c = codes + i * n_bytes, *t = table;
        uint8_t *o = out + i * n_bytes * 8;
        Py_ssize_t j = 0;
        for (; j + 8 <= n_bytes && PY_LITTLE_ENDIAN; j += 8, t += 8 * 256 * 8, o += 64) {
            uint64_t w, r[8];
            memcpy(&w, c + j, 8);
            for (int k = 0; k < 8; k++) {
                memcpy(&r[k], t + ((size_t)k * 256 + ((w >> (8 * k)) & 255)) * 8, 8);
            }
            memcpy(o, r, 64);
        }
        for (; j < n_bytes; j++, t += 256 * 8, o += 8) {
            memcpy(o, t + (size_t)c[j] * 8, 8);
        }
    }
}

/* the byte loop at a row size known when compiled (one or a few moves a row) */
#define TAKE_FIXED(ROW)                                                                            \
    static void take_fixed##ROW(const uint8_t *restrict table, const uint8_t *restrict codes,         \
                                uint8_t *restrict out, Py_ssize_t n, Py_ssize_t n_bytes) {         \
        for (Py_ssize_t i = 0; i < n; i++) {                                                       \
            const uint8_t *c = codes + i * n_bytes, *t = table;                                    \
            uint8_t *o = out + i * n_bytes * (ROW);                                                \
            TAKE_ONE(ROW)                                                                          \
        }                                                                                          \
    }
TAKE_FIXED(4)
TAKE_FIXED(16)
TAKE_FIXED(32)
TAKE_FIXED(64)

static void take_any(const uint8_t *restrict table, const uint8_t *restrict codes, uint8_t *restrict out,
                     Py_ssize_t n, Py_ssize_t n_bytes, Py_ssize_t row) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *c = codes + i * n_bytes, *t = table;
        uint8_t *o = out + i * n_bytes * row;
        TAKE_ONE(row)
    }
}

static PyObject *take_rows(PyObject *self, PyObject *args) {
    Py_buffer table, codes, out;
    Py_ssize_t n_bytes, row;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*nn", &table, &codes, &out, &n_bytes, &row)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (n_bytes <= 0 || row <= 0 || n_bytes > PY_SSIZE_T_MAX / 256 / row) {
        PyErr_Format(PyExc_ValueError, "take_rows: n_bytes %zd and row_bytes %zd must be positive (and their "
                     "table addressable)", n_bytes, row);
    } else if (codes.len > PY_SSIZE_T_MAX / row) {
        PyErr_Format(PyExc_ValueError, "take_rows: %zd code bytes decode to more than a buffer can hold", codes.len);
    } else if (table.len != n_bytes * 256 * row) {
        PyErr_Format(PyExc_ValueError, "take_rows: the table holds %zd bytes, not %zd code bytes x 256 rows x %zd",
                     table.len, n_bytes, row);
    } else if (codes.len % n_bytes) {
        PyErr_Format(PyExc_ValueError, "take_rows: %zd code bytes are not whole vectors of %zd", codes.len, n_bytes);
    } else if (out.len != codes.len * row) {
        PyErr_Format(PyExc_ValueError, "take_rows: out holds %zd bytes, the codes decode to %zd", out.len,
                     codes.len * row);
    } else {
        const uint8_t *t = (const uint8_t *)table.buf, *c = (const uint8_t *)codes.buf;
        uint8_t *o = (uint8_t *)out.buf;
        Py_ssize_t n = codes.len / n_bytes;
        Py_BEGIN_ALLOW_THREADS
        switch (row) {  /* the presets' rows: 1, 2, 4, 8 or 16 floats (PQ40x8 at D = 80: 2) */
        case 8: take_fixed8(t, c, o, n, n_bytes); break;
        case 4: take_fixed4(t, c, o, n, n_bytes); break;
        case 16: take_fixed16(t, c, o, n, n_bytes); break;
        case 32: take_fixed32(t, c, o, n, n_bytes); break;
        case 64: take_fixed64(t, c, o, n, n_bytes); break;
        default: take_any(t, c, o, n, n_bytes, row);
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&table);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"take_rows", take_rows, METH_VARARGS,
     "take_rows(table, codes, out, n_bytes, row_bytes): out[i, j] = table[j * 256 + codes[i, j]], rows of "
     "row_bytes bytes; C-contiguous buffers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lookup", "Table lookups of vq.TableDecoder in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__lookup(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef Py_GIL_DISABLED
    if (m != NULL) {
        PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED);  /* no module state: a free-threaded build keeps its GIL off */
    }
#endif
    return m;
}
