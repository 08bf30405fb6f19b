/* The record scanner's fast path in C: loadkit.source._scanner.stretch.
 *
 * One linear pass over a buffer from a record start, with exactly the rules of scanner.scan_numpy's
 * parity fast path (see scanner.py): quotes alternate between an "opening" role (the first quote
 * after the record start, the third, ...) and a "closing" role; a LF with an even count of quotes
 * since the record start ends a record. The stretch stops at the first byte the parity rule cannot
 * read -- an escape character, a bare CR (not followed by LF, or the last byte), an opening-role
 * quote not after a delimiter/LF (or a quote under doubled quoting), a closing-role quote not before
 * a delimiter/LF/CR LF/the end of final data (or a quote under doubled quoting) -- or at a record
 * longer than max_record_bytes. The caller (scanner._scan_accel) hands the record there to the exact
 * Python state machine (scanner._one_record), as the numpy path does, and calls again after it.
 *
 * The byte loop runs without the GIL (the buffer is held through the buffer protocol, so a
 * bytearray cannot be resized meanwhile).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define LF 10
#define CR 13

typedef struct {
    int64_t *p;
    Py_ssize_t len, cap;
} vec;

static int vec_push2(vec *v, int64_t a, int64_t b) {
    if (v->len + 2 > v->cap) {
        Py_ssize_t cap = v->cap ? v->cap * 2 : 4096;
        int64_t *p = (int64_t *)realloc(v->p, (size_t)cap * sizeof(int64_t));
        if (p == NULL)
            return -1;
        v->p = p;
        v->cap = cap;
    }
    v->p[v->len++] = a;
    v->p[v->len++] = b;
    return 0;
}

/* The byte at k of the data as scan_numpy's padded copy sees it: past the end, one LF when the data
 * is final (the end of final data closes a quote) else 0, then 0. */
static inline int byte_at(const uint8_t *d, Py_ssize_t n, Py_ssize_t k, int final) {
    if (k < n)
        return d[k];
    if (k == n)
        return final ? LF : 0;
    return 0;
}

PyDoc_STRVAR(stretch_doc,
"stretch(data, pos, final, delimiter, quote, escape, doublequote, cap, lfs)\n"
"-> (pairs, pos, stop, lfs, quoted_newlines, capped)\n\n"
"Records of the clean stretch of ``data`` (any buffer) from the record start ``pos``.\n"
"delimiter: a byte value; quote, escape: byte values or -1; doublequote: ``\"\"`` is one quote;\n"
"cap: max_record_bytes; lfs: LFs in data[:pos]. pairs: a bytearray of native int64 pairs\n"
"(record end, LFs before the record's start), one per record found; pos: where the stretch ended\n"
"(a record start); stop: the offset of the byte that ended it, or len(data); lfs: LFs in data[:pos];\n"
"quoted_newlines: a LF inside quotes lies before the last record end found; capped: the record at pos\n"
"is longer than cap.");

static PyObject *stretch(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, cap;
    int final, db, qb, eb, dq;
    long long lfs_in;
    if (!PyArg_ParseTuple(args, "y*npiiipnL", &view, &pos, &final, &db, &qb, &eb, &dq, &cap, &lfs_in))
        return NULL;
    const uint8_t *d = (const uint8_t *)view.buf;
    const Py_ssize_t n = view.len;
    if (pos < 0 || pos > n || db < 0 || db > 255 || qb > 255 || eb > 255 || cap < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "stretch: argument out of range");
        return NULL;
    }
    uint8_t special[256];
    memset(special, 0, sizeof special);
    special[LF] = special[CR] = 1;
    if (qb >= 0)
        special[qb] = 1;
    if (eb >= 0)
        special[eb] = 1;

    vec out = {NULL, 0, 0};
    Py_ssize_t rec = pos, stop = n;
    int64_t lfs = (int64_t)lfs_in, rec_lfs = (int64_t)lfs_in;
    int par = 0, odd_seen = 0, qnl = 0, capped = 0, nomem = 0;

    Py_ssize_t i = pos;
    Py_BEGIN_ALLOW_THREADS
#ifdef __SSE2__
    /* 64 bytes at a time while the two bytes past the block are data (so every neighbour the rules
     * look at is a real byte; the rest goes through the scalar loop below, which also knows the end
     * of data). Bit k of a mask is byte i+k. */
    const __m128i vlf = _mm_set1_epi8((char)LF), vcr = _mm_set1_epi8((char)CR), vd = _mm_set1_epi8((char)db);
    const __m128i vq = _mm_set1_epi8((char)(qb < 0 ? 0 : qb)), ve = _mm_set1_epi8((char)(eb < 0 ? 0 : eb));
    int done = 0;
    for (; !done && i + 66 <= n; i += 64) {
        uint64_t L = 0, C = 0, D = 0, Q = 0, E = 0;
        for (int k = 0; k < 4; k++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(d + i + 16 * k));
            L |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, vlf)) << (16 * k);
            C |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, vcr)) << (16 * k);
            D |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, vd)) << (16 * k);
            if (qb >= 0)
                Q |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, vq)) << (16 * k);
            if (eb >= 0)
                E |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, ve)) << (16 * k);
        }
        const int p0 = i ? d[i - 1] : LF, n0 = d[i + 64], n1 = d[i + 65];
        const uint64_t Lprev = (L << 1) | (uint64_t)(p0 == LF), Dprev = (D << 1) | (uint64_t)(p0 == db);
        const uint64_t Qprev = (Q << 1) | (uint64_t)(qb >= 0 && p0 == qb);
        const uint64_t Lnext = (L >> 1) | ((uint64_t)(n0 == LF) << 63), Dnext = (D >> 1) | ((uint64_t)(n0 == db) << 63);
        const uint64_t Cnext = (C >> 1) | ((uint64_t)(n0 == CR) << 63);
        const uint64_t Qnext = (Q >> 1) | ((uint64_t)(qb >= 0 && n0 == qb) << 63);
        const uint64_t Lnext2 = (L >> 2) | ((uint64_t)(n0 == LF) << 62) | ((uint64_t)(n1 == LF) << 63);
        /* inside: bit k set when an odd number of quotes since the record start precede byte k */
        uint64_t x = Q;
        x ^= x << 1; x ^= x << 2; x ^= x << 4; x ^= x << 8; x ^= x << 16; x ^= x << 32;
        const uint64_t inside = (x ^ Q) ^ (par ? ~(uint64_t)0 : 0);
        const uint64_t open_ok = Dprev | Lprev | (dq ? Qprev : 0);
        const uint64_t close_ok = Dnext | Lnext | (Cnext & Lnext2) | (dq ? Qnext : 0);
        const uint64_t S = E | (C & ~Lnext) | (Q & ~inside & ~open_ok) | (Q & inside & ~close_ok);
        uint64_t valid = ~(uint64_t)0;
        if (S) {
            const int first = __builtin_ctzll(S);
            valid = first ? (~(uint64_t)0 >> (64 - first)) : 0;
            stop = i + first;
            done = 1;
        }
        const uint64_t odd = L & inside & valid;
        uint64_t ends = L & ~inside & valid;
        while (ends) {
            const int k = __builtin_ctzll(ends);
            const uint64_t below = k ? (~(uint64_t)0 >> (64 - k)) : 0;
            const Py_ssize_t end = i + k + 1;
            if (end - rec > cap) {
                capped = 1;
                break;
            }
            if (vec_push2(&out, (int64_t)end, rec_lfs) < 0) {
                nomem = 1;
                break;
            }
            qnl |= odd_seen | ((odd & below) != 0);
            rec = end;
            rec_lfs = lfs + __builtin_popcountll(L & below) + 1;
            ends &= ends - 1;
        }
        if (capped || nomem) {
            stop = n;
            done = 2;
            break;
        }
        lfs += __builtin_popcountll(L & valid);
        odd_seen |= odd != 0;
        par ^= __builtin_popcountll(Q & valid) & 1;
    }
    if (done)
        i = n;  /* stopped (stop set) or capped: nothing left for the scalar loop */
#endif
    for (; i < n; i++) {
        const uint8_t c = d[i];
        if (!special[c])
            continue;
        if (c == LF) {
            if (par) {  /* inside quotes */
                odd_seen = 1;
                lfs++;
                continue;
            }
            if (i + 1 - rec > cap) {
                capped = 1;
                break;
            }
            if (vec_push2(&out, (int64_t)(i + 1), rec_lfs) < 0) {
                nomem = 1;
                break;
            }
            qnl |= odd_seen;
            lfs++;
            rec = i + 1;
            rec_lfs = lfs;
            continue;
        }
        if (c == CR) {
            if (i + 1 < n && d[i + 1] == LF)
                continue;
            stop = i;  /* a bare CR */
            break;
        }
        if ((int)c == eb) {
            stop = i;
            break;
        }
        /* a quote */
        if (!par) {
            const int prev = i ? d[i - 1] : LF;
            if (!(prev == db || prev == LF || (dq && prev == qb))) {
                stop = i;
                break;
            }
        } else {
            const int nxt = byte_at(d, n, i + 1, final);
            if (!(nxt == db || nxt == LF || (nxt == CR && byte_at(d, n, i + 2, final) == LF) || (dq && nxt == qb))) {
                stop = i;
                break;
            }
        }
        par ^= 1;
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&view);
    if (nomem) {
        free(out.p);
        return PyErr_NoMemory();
    }
    PyObject *pairs = PyByteArray_FromStringAndSize((const char *)out.p, (Py_ssize_t)(out.len * sizeof(int64_t)));
    free(out.p);
    if (pairs == NULL)
        return NULL;
    return Py_BuildValue("NnnLii", pairs, rec, stop, (long long)rec_lfs, qnl, capped);
}

static PyMethodDef methods[] = {
    {"stretch", stretch, METH_VARARGS, stretch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scanner",
    "C fast path of loadkit.source.scanner (see scanner._scan_accel); optional, numpy is the fallback.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__scanner(void) { return PyModule_Create(&module); }
