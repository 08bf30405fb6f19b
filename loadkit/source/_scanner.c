/* The record scanner in C: loadkit.source._scanner.scan, the same records as scanner.scan_numpy.
 *
 * Clean stretches (stretch_core): one linear pass from a record start with exactly the rules of
 * scanner.scan_numpy's parity fast path (see scanner.py): quotes alternate between an "opening"
 * role (the first quote after the record start, the third, ...) and a "closing" role; a LF with an
 * even count of quotes since the record start ends a record. A stretch stops at the first byte the
 * parity rule cannot read -- an escape character, a bare CR (not followed by LF, or the last byte),
 * an opening-role quote not after a delimiter/LF (or a quote under doubled quoting), a closing-role
 * quote not before a delimiter/LF/CR LF/the end of final data (or a quote under doubled quoting) --
 * or at a record longer than max_record_bytes. The record there is read by one_record, a line-for-line
 * port of scanner._one_record (the per-token state machine), and marked slow, exactly where
 * scan_numpy calls _one_record; then the next stretch starts.
 *
 * Everything runs without the GIL (the buffer is held through the buffer protocol, so a bytearray
 * cannot be resized meanwhile).
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


typedef struct {
    int db, qb, eb, dq, lenient;  /* delimiter byte; quote, escape bytes or -1; doubled quotes; lenient */
    Py_ssize_t cap;                /* max_record_bytes */
} dialect;

/* One clean stretch from the record start *pos_io: appends (end, LFs before the record's start) per
 * record to out; on return *pos_io is the record start where it stopped, *lfs_io the LFs before it,
 * *stop the byte that stopped it (or n), *capped set when the record at *pos_io is longer than cap,
 * *qnl_io set when a LF inside quotes lies before the last record end found. -1: out of memory. */
static int stretch_core(const uint8_t *d, const Py_ssize_t n, const int final, const dialect *k,
                        Py_ssize_t *pos_io, int64_t *lfs_io, int *qnl_io, Py_ssize_t *stop_out, int *capped_out,
                        vec *out) {
    const int db = k->db, qb = k->qb, eb = k->eb, dq = k->dq;
    const Py_ssize_t cap = k->cap, pos = *pos_io;
    uint8_t special[256];
    memset(special, 0, sizeof special);
    special[LF] = special[CR] = 1;
    if (qb >= 0)
        special[qb] = 1;
    if (eb >= 0)
        special[eb] = 1;
    Py_ssize_t rec = pos, stop = n;
    int64_t lfs = *lfs_io, rec_lfs = *lfs_io;
    int par = 0, odd_seen = 0, qnl = 0, capped = 0, nomem = 0;
    Py_ssize_t i = pos;
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
            if (vec_push2(out, (int64_t)end, rec_lfs) < 0) {
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
            if (vec_push2(out, (int64_t)(i + 1), rec_lfs) < 0) {
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

    *pos_io = rec;
    *lfs_io = rec_lfs;
    *qnl_io |= qnl;
    *stop_out = stop;
    *capped_out = capped;
    return nomem ? -1 : 0;
}

/* The first offset in [p, stop) holding one of the bytes a, b, c; -1 when none does. */
static inline Py_ssize_t find3(const uint8_t *d, Py_ssize_t p, Py_ssize_t stop, int a, int b, int c) {
    for (; p < stop; p++) {
        const int x = d[p];
        if (x == a || x == b || x == c)
            return p;
    }
    return -1;
}

static inline Py_ssize_t find_lf(const uint8_t *d, Py_ssize_t p, Py_ssize_t n) {
    if (p >= n)
        return -1;
    const uint8_t *hit = memchr(d + p, LF, (size_t)(n - p));
    return hit ? (Py_ssize_t)(hit - d) : -1;
}

static inline int64_t count_lf(const uint8_t *d, Py_ssize_t a, Py_ssize_t b) {
    int64_t c = 0;
    while (a < b) {
        const uint8_t *hit = memchr(d + a, LF, (size_t)(b - a));
        if (!hit)
            break;
        c++;
        a = (Py_ssize_t)(hit - d) + 1;
    }
    return c;
}

enum { RK_NEED = -1, RK_OK = 0, RK_UNTERMINATED = 1, RK_TOO_LONG = 2, RK_MALFORMED = 3 };

/* scanner._one_record, line for line: the record starting at s. Returns RK_NEED (the buffer ends first
 * and is not final), or a kind with *end set; *aux: for RK_UNTERMINATED the LFs between s and the
 * opening quote, for RK_MALFORMED the byte after the closing quote. */
static int one_record(const uint8_t *d, const Py_ssize_t n, const Py_ssize_t s, const int final,
                      const dialect *k, Py_ssize_t *end, int64_t *aux) {
    const Py_ssize_t cap_end = s + k->cap;
    const int db = k->db, qb = k->qb, eb = k->eb;
    Py_ssize_t i = s;
#define LINE_END(p, out_)                         \
    do {                                          \
        Py_ssize_t lf_ = find_lf(d, (p), n);      \
        if (lf_ < 0) {                            \
            if (!final)                           \
                return RK_NEED;                    \
            (out_) = n;                           \
        } else                                    \
            (out_) = lf_ + 1;                     \
    } while (0)
#define TOO_LONG_RET()                            \
    do {                                          \
        Py_ssize_t lf_ = find_lf(d, cap_end - 1, n); \
        if (lf_ < 0) {                            \
            if (!final)                           \
                return RK_NEED;                    \
            *end = n;                             \
        } else                                    \
            *end = lf_ + 1;                       \
        return RK_TOO_LONG;                        \
    } while (0)
    for (;;) {
        if (i >= cap_end)
            TOO_LONG_RET();
        if (i >= n) {
            if (!final)
                return RK_NEED;
            *end = n;
            return RK_OK;
        }
        if (qb >= 0 && d[i] == qb) {
            const Py_ssize_t open_at = i;
            i += 1;
            for (;;) {
                const Py_ssize_t lim = n < cap_end ? n : cap_end;
                const Py_ssize_t j = find3(d, i, lim, qb, eb >= 0 ? eb : qb, qb);
                if (j < 0) {
                    if (cap_end <= n || final) {
                        Py_ssize_t e;
                        LINE_END(open_at, e);
                        if (e > cap_end)
                            TOO_LONG_RET();
                        *end = e;
                        *aux = count_lf(d, s, open_at);
                        return RK_UNTERMINATED;
                    }
                    return RK_NEED;
                }
                if (eb >= 0 && d[j] == eb) {
                    i = j + 2;
                    continue;
                }
                if (j + 1 >= n && !final)
                    return RK_NEED;
                const int nxt = j + 1 < n ? d[j + 1] : -1;  /* -1: b"" (the end of final data) */
                if (k->dq && nxt == qb) {
                    i = j + 2;
                    continue;
                }
                if (nxt == db || nxt == LF || nxt == -1 || (nxt == CR && j + 2 < n && d[j + 2] == LF)
                    || (nxt == CR && j + 2 >= n && final)) {
                    i = j + 1;
                    break;
                }
                if (nxt == CR && j + 2 >= n)
                    return RK_NEED;
                if (k->lenient) {
                    i = j + 1;
                    continue;
                }
                Py_ssize_t e;
                LINE_END(j, e);
                if (e > cap_end)
                    TOO_LONG_RET();
                *end = e;
                *aux = nxt;
                return RK_MALFORMED;
            }
            /* after a closing quote: the delimiter, CR LF, LF or the end */
            if (i >= n) {
                *end = n;
                return RK_OK;
            }
            const int c = d[i];
            if (c == db) {
                i += 1;
                continue;
            }
            if (c == CR)
                i += 1;
            *end = i + 1 < n ? i + 1 : n;
            return RK_OK;
        }
        /* an unquoted field: the next delimiter or LF, escape+char pairs skipped */
        Py_ssize_t j;
        {
            const Py_ssize_t stop = n < cap_end ? n : cap_end;
            Py_ssize_t p = i;
            for (;;) {
                j = find3(d, p, stop, db, LF, eb >= 0 ? eb : db);
                if (j < 0 || eb < 0 || d[j] != eb)
                    break;
                if (j + 1 >= n && !final)
                    return RK_NEED;
                p = j + 2;
            }
        }
        if (j < 0) {
            if (cap_end <= n)
                TOO_LONG_RET();
            if (!final)
                return RK_NEED;
            *end = n;
            return RK_OK;
        }
        if (d[j] == LF) {
            *end = j + 1;
            return RK_OK;
        }
        i = j + 1;
    }
#undef LINE_END
#undef TOO_LONG_RET
}

PyDoc_STRVAR(scan_doc,
"scan(data, final, delimiter, quote, escape, doublequote, lenient, cap)\n"
"-> (pairs, slow, errors, quoted_newlines)\n\n"
"Every complete record of ``data`` (any buffer), as scanner.scan_numpy finds them. delimiter: a byte\n"
"value; quote, escape: byte values or -1; doublequote: ``\"\"`` is one quote; lenient: lenient quoting;\n"
"cap: max_record_bytes. pairs: a bytearray of native int64 pairs (record end, LFs before the record's\n"
"start); slow: a bytearray of native int64 indexes of the records the state machine read; errors: a\n"
"list of (record index, kind, aux): kind 1 unterminated quote (aux: LFs from the record start to the\n"
"quote), 2 too long, 3 malformed quoting (aux: the byte after the closing quote).");

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t cap;
    int final, db, qb, eb, dq, lenient;
    if (!PyArg_ParseTuple(args, "y*piiippn", &view, &final, &db, &qb, &eb, &dq, &lenient, &cap))
        return NULL;
    const uint8_t *d = (const uint8_t *)view.buf;
    const Py_ssize_t n = view.len;
    if (db < 0 || db > 255 || qb > 255 || eb > 255 || cap < 1) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "scan: argument out of range");
        return NULL;
    }
    const dialect k = {db, qb < 0 ? -1 : qb, eb < 0 ? -1 : eb, dq, lenient, cap};
    vec out = {NULL, 0, 0}, slow = {NULL, 0, 0}, errs = {NULL, 0, 0};
    int qnl = 0, nomem = 0;

    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t pos = 0;
    int64_t lfs = 0;
    while (pos < n) {
        Py_ssize_t stop;
        int capped;
        if (stretch_core(d, n, final, &k, &pos, &lfs, &qnl, &stop, &capped, &out) < 0) {
            nomem = 1;
            break;
        }
        if (pos >= n)
            break;
        if (!capped && stop == n && !final && n - pos <= cap)
            break;  /* the tail holds no complete record yet: wait for more data */
        Py_ssize_t end = 0;
        int64_t aux = 0;
        const int kind = one_record(d, n, pos, final, &k, &end, &aux);
        if (kind == RK_NEED)
            break;
        const int64_t index = out.len / 2;
        if (vec_push2(&out, (int64_t)end, lfs) < 0 || vec_push2(&slow, index, 0) < 0) {
            nomem = 1;
            break;
        }
        if (kind != RK_OK) {
            if (vec_push2(&errs, index, kind) < 0 || vec_push2(&errs, aux, 0) < 0) {
                nomem = 1;
                break;
            }
        } else if (!qnl && end - 1 > pos && memchr(d + pos, LF, (size_t)(end - 1 - pos)) != NULL) {
            qnl = 1;
        }
        lfs += count_lf(d, pos, end);
        pos = end;
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&view);
    PyObject *pairs = NULL, *slow_idx = NULL, *errors = NULL, *result = NULL;
    if (nomem) {
        PyErr_NoMemory();
        goto done;
    }
    pairs = PyByteArray_FromStringAndSize((const char *)out.p, (Py_ssize_t)(out.len * sizeof(int64_t)));
    if (pairs == NULL)
        goto done;
    {
        /* slow holds (index, 0) pairs: keep the indexes */
        for (Py_ssize_t t = 0; t < slow.len / 2; t++)
            slow.p[t] = slow.p[2 * t];
        slow_idx = PyByteArray_FromStringAndSize((const char *)slow.p, (Py_ssize_t)(slow.len / 2 * sizeof(int64_t)));
    }
    if (slow_idx == NULL)
        goto done;
    errors = PyList_New(0);
    if (errors == NULL)
        goto done;
    for (Py_ssize_t t = 0; t + 3 < errs.len; t += 4) {
        PyObject *item = Py_BuildValue("LiL", (long long)errs.p[t], (int)errs.p[t + 1], (long long)errs.p[t + 2]);
        if (item == NULL || PyList_Append(errors, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    result = Py_BuildValue("OOOi", pairs, slow_idx, errors, qnl);
done:
    Py_XDECREF(pairs);
    Py_XDECREF(slow_idx);
    Py_XDECREF(errors);
    free(out.p);
    free(slow.p);
    free(errs.p);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scanner",
    "The record scanner in C (see scanner._scan_accel); optional, scanner.scan_numpy is the fallback.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__scanner(void) { return PyModule_Create(&module); }
