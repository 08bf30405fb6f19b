/* Merge's key hashes in C: loadkit.postgres._keyhash.fold_var_width, the same numbers as keyhints'
 * numpy path (_var_width_hash, _mix, the NULL constant and key_hashes' combine) for one string/binary key
 * column, fused into one pass over the Arrow buffers and run without the GIL.
 *
 * Per value: its length L (trailing spaces dropped when rstrip: char(n)), then h = L, and for each of its
 * own 8-byte lanes (max(1, ceil(L / 8)), the last zero-padded; a lane is read as a native uint64, as the
 * numpy path views its padded bytes) h = h * P + lane; the column hash is splitmix64's finaliser of h, or
 * the NULL constant for a NULL slot. The row's running hash then becomes mix(row * MIX0 + column hash).
 * Every slot's length is checked against max_key_bytes (NULL slots too, as the numpy path does): a longer
 * one returns False and leaves the running hashes half-folded (the caller drops them).
 *
 * The buffers are held through the buffer protocol for the call, so nothing can free them meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FNV_P 0x100000001B3ULL
#define NULL_HASH 0x9E3779B97F4A7C15ULL
#define MIX0 0xBF58476D1CE4E5B9ULL
#define MIX1 0x94D049BB133111EBULL
#define PREFETCH_AHEAD 16

static inline uint64_t mix(uint64_t h) {
    h ^= h >> 30;
    h *= MIX0;
    h ^= h >> 27;
    h *= MIX1;
    h ^= h >> 31;
    return h;
}

static inline int64_t offset_at(const void *offsets, int wide, Py_ssize_t i) {
    return wide ? ((const int64_t *)offsets)[i] : (int64_t)((const int32_t *)offsets)[i];
}

static int fold(uint64_t *rows, const void *offsets, const uint8_t *data, Py_ssize_t data_len,
                const uint8_t *validity, Py_ssize_t start, Py_ssize_t n, int wide, int rstrip,
                int64_t max_key_bytes) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = offset_at(offsets, wide, start + i), e = offset_at(offsets, wide, start + i + 1);
        if (s < 0 || e < s || e > data_len)
            return -1;
        if (rstrip)
            while (e > s && data[e - 1] == ' ')
                e--;
        int64_t len = e - s;
        if (len > max_key_bytes)
            return 0;
        uint64_t h = (uint64_t)len;
        int64_t lanes = len ? (len + 7) / 8 : 1;
        for (int64_t j = 0; j < lanes; j++) {
            uint64_t lane = 0;
            int64_t at = s + 8 * j, take = e - at;
            if (take >= 8) {
                memcpy(&lane, data + at, 8); /* a fixed-size copy: one load */
            } else if (take > 0) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
                for (int64_t k = 0; k < take; k++) /* the native (little-endian) uint64 of the zero-padded lane */
                    lane |= (uint64_t)data[at + k] << (8 * k);
#else
                memcpy(&lane, data + at, (size_t)take);
#endif
            }
            h = h * FNV_P + lane;
        }
        h = mix(h);
        if (validity != NULL && !((validity[(start + i) >> 3] >> ((start + i) & 7)) & 1))
            h = NULL_HASH;
        rows[i] = mix(rows[i] * MIX0 + h);
    }
    return 1;
}

static PyObject *fold_var_width(PyObject *self, PyObject *args) {
    Py_buffer rows, offsets, data, validity;
    PyObject *validity_obj;
    Py_ssize_t start, n;
    int wide, rstrip;
    long long max_key_bytes;
    if (!PyArg_ParseTuple(args, "w*y*y*OnnppL:fold_var_width", &rows, &offsets, &data, &validity_obj, &start, &n,
                          &wide, &rstrip, &max_key_bytes))
        return NULL;
    int has_validity = validity_obj != Py_None;
    if (has_validity && PyObject_GetBuffer(validity_obj, &validity, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&rows);
        PyBuffer_Release(&offsets);
        PyBuffer_Release(&data);
        return NULL;
    }
    const char *error = NULL;
    Py_ssize_t width = wide ? 8 : 4;
    if (start < 0 || n < 0)
        error = "negative start or count";
    else if (rows.len < n * (Py_ssize_t)sizeof(uint64_t))
        error = "the running hashes are shorter than n";
    else if (offsets.len < (start + n + 1) * width)
        error = "the offsets buffer is shorter than start + n + 1 offsets";
    else if (has_validity && validity.len * 8 < start + n)
        error = "the validity bitmap is shorter than start + n bits";
    int done = -1;
    if (error == NULL) {
        Py_BEGIN_ALLOW_THREADS
        done = fold((uint64_t *)rows.buf, offsets.buf, (const uint8_t *)data.buf, data.len,
                    has_validity ? (const uint8_t *)validity.buf : NULL, start, n, wide, rstrip,
                    (int64_t)max_key_bytes);
        Py_END_ALLOW_THREADS
        if (done < 0)
            error = "an offset points outside the data buffer";
    }
    PyBuffer_Release(&rows);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    if (has_validity)
        PyBuffer_Release(&validity);
    if (error != NULL) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    return PyBool_FromLong(done);
}

static PyObject *seen_before(PyObject *self, PyObject *args) {
    Py_buffer bitmap, hashes, maybe;
    int shift;
    if (!PyArg_ParseTuple(args, "w*y*w*i:seen_before", &bitmap, &hashes, &maybe, &shift))
        return NULL;
    Py_ssize_t n = hashes.len / (Py_ssize_t)sizeof(uint64_t);
    const char *error = NULL;
    if (shift < 7 || shift > 63)
        error = "shift out of range";
    else if (maybe.len < n)
        error = "the maybe array is shorter than the hashes";
    else if (bitmap.len < (Py_ssize_t)((UINT64_MAX >> shift) / 64 + 1) * (Py_ssize_t)sizeof(uint64_t))
        error = "the bitmap is shorter than the hashes' top bits address";
    if (error == NULL) {
        uint64_t *words = (uint64_t *)bitmap.buf;
        const uint64_t *h = (const uint64_t *)hashes.buf;
        uint8_t *out = (uint8_t *)maybe.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i + PREFETCH_AHEAD < n) /* the bitmap is 16 MB: overlap the next rows' cache misses */
                __builtin_prefetch(words + ((h[i + PREFETCH_AHEAD] >> shift) >> 6), 1);
            uint64_t bit = h[i] >> shift, mask = 1ULL << (bit & 63);
            uint64_t *word = words + (bit >> 6);
            out[i] = (*word & mask) != 0;
            *word |= mask;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&bitmap);
    PyBuffer_Release(&hashes);
    PyBuffer_Release(&maybe);
    if (error != NULL) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"seen_before", seen_before, METH_VARARGS,
     "seen_before(bitmap, hashes, maybe, shift, /) -> None\n\n"
     "Per hash, in order: maybe[i] = its bit (hash >> shift) of ``bitmap`` (uint64 words) was already set --\n"
     "by an earlier batch or an earlier row of this one; then set it."},
    {"fold_var_width", fold_var_width, METH_VARARGS,
     "fold_var_width(rows, offsets, data, validity, start, n, wide, rstrip, max_key_bytes, /) -> bool\n\n"
     "Fold one string/binary key column (Arrow buffers; validity None: no NULLs) into the running uint64 row\n"
     "hashes ``rows`` in place, as keyhints' numpy path does; False if a value is longer than max_key_bytes."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_keyhash",
                                    "Merge's key hashes in C (see _keyhash.c and keyhints.key_hashes).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__keyhash(void) { return PyModule_Create(&module); }
