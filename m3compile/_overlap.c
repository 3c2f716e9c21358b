/* Paper Eq. 6 in C: N, the longest common subsequence of a reference r and a window of its query t.

   lcs_in_windows(t, r) -> N, for sequences of ints (lists or tuples of token ids): the largest
   LCS(t[a:a + W], r) over window starts a, W = min(|t|, 2|r| + 1); retrieve.overlap divides it by
   |r|. The same bit-parallel DP as retrieve._overlap_python (Allison & Dix 1986, Hyyro 2004), with
   the reference's positions in 64-bit words instead of one Python int: a column of the DP table per
   query token is V' = (V + U) | (V - U), U = V & match(t_i). U's bits are V's, so V - U = V & ~U
   (no borrow) and only the sum carries from word to word. The same integer N as the Python loop,
   which stays the reference (tests/test_retrieval.py compares them) and the fallback where no C
   compiler built this module.

   Why C: the filter runs on every candidate of every query with max_overlap (`m3 train` filters
   each 64-token chunk's candidates, `m3 eval` and the benchmarks each question's): a 64-token
   query against a 32-token reference is 64 steps of Python big-int arithmetic: 45 us a check on a
   training run's chunks against 4.0 us here, and the retrieval before that run 1.8x as fast
   (benchmarks/overlap_filter.py, 2026-12-07, AVX2 AMD EPYC). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

static int popcount64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_popcountll(x);
#else
    int n = 0;
    for (; x; x &= x - 1) n++;
    return n;
#endif
}

/* the ints of a sequence into a fresh array (NULL with an exception set). Read from a tuple copy:
   PyLong_AsLongLong may run an item's __index__, which could change a list under a borrowed
   items pointer; the tuple holds its own references */
static long long *as_tokens(PyObject *seq, Py_ssize_t *n, const char *what) {
    PyObject *fast = PyTuple_Check(seq) ? (Py_INCREF(seq), seq) : PySequence_Tuple(seq);
    if (fast == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_SetString(PyExc_TypeError, what);
        }
        return NULL;
    }
    *n = PyTuple_GET_SIZE(fast);
    long long *out = PyMem_Malloc(sizeof(long long) * (size_t)(*n > 0 ? *n : 1));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(fast, i));
        if (out[i] == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    return out;
}

static PyObject *lcs_in_windows(PyObject *self, PyObject *args) {
    PyObject *tq, *rq;
    if (!PyArg_ParseTuple(args, "OO", &tq, &rq)) return NULL;
    Py_ssize_t nt, n;
    long long *t = as_tokens(tq, &nt, "query tokens must be a list or tuple of ints");
    if (t == NULL) return NULL;
    long long *r = as_tokens(rq, &n, "reference tokens must be a list or tuple of ints");
    if (r == NULL) {
        PyMem_Free(t);
        return NULL;
    }
    Py_ssize_t best = 0;
    if (n > 0 && nt > 0) {
        Py_ssize_t words = (n + 63) / 64;
        Py_ssize_t w = nt < 2 * n + 1 ? nt : 2 * n + 1;
        uint64_t top = n % 64 ? (((uint64_t)1 << (n % 64)) - 1) : ~(uint64_t)0;  /* the last word's bits */
        /* match[i][k]: the positions of r in word k that hold t[i]; then the column vector v */
        uint64_t *match = PyMem_Calloc((size_t)(nt * words + words), sizeof(uint64_t));
        if (match == NULL) {
            PyMem_Free(t);
            PyMem_Free(r);
            return PyErr_NoMemory();
        }
        uint64_t *v = match + nt * words;
        for (Py_ssize_t i = 0; i < nt; i++) {
            uint64_t *m = match + i * words;
            for (Py_ssize_t j = 0; j < n; j++) {
                m[j / 64] |= (uint64_t)(r[j] == t[i]) << (j % 64);
            }
        }
        for (Py_ssize_t a = 0; a + w <= nt && best < n; a++) {
            for (Py_ssize_t k = 0; k < words; k++) v[k] = ~(uint64_t)0;
            v[words - 1] = top;  /* zero bits count the LCS so far */
            for (Py_ssize_t i = a; i < a + w; i++) {
                const uint64_t *m = match + i * words;
                uint64_t carry = 0;
                for (Py_ssize_t k = 0; k < words; k++) {
                    uint64_t u = v[k] & m[k], s = v[k] + u, s2 = s + carry;
                    carry = (uint64_t)(s < u) | (uint64_t)(s2 < s);
                    v[k] = s2 | (v[k] & ~u);
                }
                v[words - 1] &= top;  /* the carry out of bit n - 1 is dropped, as `& full` */
            }
            Py_ssize_t zeros = n;
            for (Py_ssize_t k = 0; k < words; k++) zeros -= popcount64(v[k]);
            if (zeros > best) best = zeros;
        }
        PyMem_Free(match);
    }
    PyMem_Free(t);
    PyMem_Free(r);
    return PyLong_FromSsize_t(best);
}

static PyMethodDef methods[] = {
    {"lcs_in_windows", lcs_in_windows, METH_VARARGS,
     "lcs_in_windows(t, r): the largest LCS of r and a window of min(|t|, 2|r| + 1) tokens of t (paper Eq. 6's N); "
     "lists or tuples of ints"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_overlap", "Paper Eq. 6's overlap count in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__overlap(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef Py_GIL_DISABLED
    if (m != NULL) PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED);
#endif
    return m;
}
