/* The float casts of ckpttool/writers/cast_kernels.py, compiled: one pass over memory.
 *
 * cast(src, dst, source_buffer, destination_buffer) converts every element of a buffer of
 * float32, float16 or bfloat16 bit patterns into another of those formats, with the bits
 * torch's .to(dtype) gives: through float32 (exact for the 2-byte formats), then round to
 * nearest even, overflow to infinity, subnormals kept. NaN stays NaN of the same sign, quiet,
 * keeping its top payload bits, as ckpttool's numpy kernels and tables do (see numeric.py).
 *
 * Plain C that compilers vectorise (no intrinsics, nothing chosen by CPU model): every branch
 * below is a select. Loads and stores go through memcpy, so buffers need no alignment. The GIL
 * is released while a cast runs, so that several threads cast parts of one tensor at once.
 *
 * The extension is optional (setup.py builds it where a compiler exists); without it the numpy
 * kernels do the same work, and tests/test_fastcast.py checks both against each other over
 * every 2-byte pattern and against torch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };
static const Py_ssize_t SIZE[] = {4, 2, 2};

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* ``yes`` where ``cond``, else ``no``, with masks: compilers keep a loop of these vectorised
 * (a ?: over values computed with float arithmetic can become a branch). */
static inline uint32_t pick(int cond, uint32_t yes, uint32_t no)
{
    uint32_t mask = 0u - (uint32_t)(cond != 0);
    return (yes & mask) | (no & ~mask);
}

/* float16 bits -> float32 bits, exact (a NaN keeps its sign and payload, made quiet). */
static inline uint32_t widen_f16(uint32_t h)
{
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t o = (h & 0x7fffu) << 13;
    uint32_t exp = o & 0x0f800000u;
    uint32_t normal = o + ((127u - 15u) << 23);
    uint32_t special = normal + ((128u - 16u) << 23);              /* infinity, NaN */
    uint32_t small = as_bits(as_float(normal + (1u << 23)) - as_float(113u << 23));
    uint32_t r = pick(exp == 0x0f800000u, special | ((h & 0x7fffu) > 0x7c00u) << 22, normal);
    r = pick(exp == 0, small, r);                                   /* zero, subnormal */
    return r | sign;
}

/* float32 bits -> bfloat16 bits, nearest even. */
static inline uint32_t narrow_bf16(uint32_t u)
{
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return pick((u & 0x7fffffffu) > 0x7f800000u, nan, rounded);
}

/* float32 bits -> float16 bits, nearest even (F. Giesen's method, every case a select). */
static inline uint32_t narrow_f16(uint32_t u)
{
    uint32_t f = u & 0x7fffffffu;
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t normal = (f + 0xC8000FFFu + ((f >> 13) & 1u)) >> 13;  /* rebias, round */
    uint32_t small = as_bits(as_float(f) + 0.5f) - 0x3f000000u;     /* subnormal, or zero */
    uint32_t nan = 0x7e00u | ((f >> 13) & 0x3ffu);
    uint32_t r = pick(f < 0x38800000u, small, normal);              /* below 2**-14 */
    r = pick(f >= 0x47800000u, 0x7c00u, r);                         /* 65536 and up */
    r = pick(f > 0x7f800000u, nan, r);
    return r | sign;
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define LOOP(NAME, SBYTES, STYPE, DBYTES, DTYPE, EXPR)                        \
    CLONES static void NAME(const char *src, char *dst, Py_ssize_t n)                \
    {                                                                         \
        for (Py_ssize_t i = 0; i < n; i++) {                                  \
            STYPE x;                                                          \
            memcpy(&x, src + i * SBYTES, SBYTES);                             \
            DTYPE y = (DTYPE)(EXPR);                                          \
            memcpy(dst + i * DBYTES, &y, DBYTES);                             \
        }                                                                     \
    }

#if defined(__GNUC__)
/* float32 -> float16 and bfloat16 eight at a time, written with vector types so that the
 * narrowing to 16 bits is one conversion instead of what the vectoriser makes of a loop. */
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

/* No vector crosses a function boundary (GCC warns about the ABI of 32-byte arguments
 * without AVX): the helpers are macros and work on a vector in place. */
#define VPICK(mask, yes, no) (((yes) & (u32x8)(mask)) | ((no) & ~(u32x8)(mask)))

static inline void vnarrow_f16(u32x8 *v)
{
    u32x8 u = *v, f = u & 0x7fffffffu;
    u32x8 normal = (f + 0xC8000FFFu + ((f >> 13) & 1u)) >> 13;
    u32x8 small = (u32x8)((f32x8)f + 0.5f) - 0x3f000000u;
    u32x8 r = VPICK(f < 0x38800000u, small, normal);
    r = VPICK(f >= 0x47800000u, (u32x8){0} + 0x7c00u, r);
    r = VPICK(f > 0x7f800000u, 0x7e00u | ((f >> 13) & 0x3ffu), r);
    *v = r | ((u >> 16) & 0x8000u);
}

static inline void vnarrow_bf16(u32x8 *v)
{
    u32x8 u = *v;
    u32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    *v = VPICK((u & 0x7fffffffu) > 0x7f800000u, (u >> 16) | 0x40u, rounded);
}

#define NARROW(NAME, VEXPR, EXPR)                                             \
    CLONES static void NAME(const char *src, char *dst, Py_ssize_t n)         \
    {                                                                         \
        Py_ssize_t i = 0;                                                     \
        for (; i + 8 <= n; i += 8) {                                          \
            u32x8 u;                                                          \
            memcpy(&u, src + i * 4, 32);                                      \
            VEXPR(&u);                                                        \
            u16x8 r = __builtin_convertvector(u, u16x8);                      \
            memcpy(dst + i * 2, &r, 16);                                      \
        }                                                                     \
        for (; i < n; i++) {                                                  \
            uint32_t x;                                                       \
            memcpy(&x, src + i * 4, 4);                                       \
            uint16_t y = (uint16_t)EXPR(x);                                   \
            memcpy(dst + i * 2, &y, 2);                                       \
        }                                                                     \
    }

NARROW(f32_f16, vnarrow_f16, narrow_f16)
NARROW(f32_bf16, vnarrow_bf16, narrow_bf16)
#else
LOOP(f32_f16, 4, uint32_t, 2, uint16_t, narrow_f16(x))
LOOP(f32_bf16, 4, uint32_t, 2, uint16_t, narrow_bf16(x))
#endif
LOOP(f16_f32, 2, uint16_t, 4, uint32_t, widen_f16(x))

/* float16 -> bfloat16. A normal float16 loses 3 mantissa bits and moves its exponent, which
 * 16-bit arithmetic does 16 elements at a time (GCC's and clang's vector extensions: SSE2,
 * AVX2 or NEON as the target has them); a group of 16 that holds a zero, a subnormal, an
 * infinity or a NaN is done again one by one through float32. */
#if defined(__GNUC__)
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));

CLONES static void f16_bf16(const char *src, char *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        u16x16 h, r;
        memcpy(&h, src + i * 2, 32);
        u16x16 a = h & 0x7fff;
        r = ((((a + 3) + ((a >> 3) & 1)) >> 3) + 0x3800) | (h & 0x8000);
        u64x4 odd = (u64x4)((a - 0x400) >= 0x7800);  /* below 2**-14, or not finite */
        if (odd[0] | odd[1] | odd[2] | odd[3]) {
            for (int j = 0; j < 16; j++)
                r[j] = (uint16_t)narrow_bf16(widen_f16(h[j]));
        }
        memcpy(dst + i * 2, &r, 32);
    }
    for (; i < n; i++) {
        uint16_t x;
        memcpy(&x, src + i * 2, 2);
        x = (uint16_t)narrow_bf16(widen_f16(x));
        memcpy(dst + i * 2, &x, 2);
    }
}
#else
LOOP(f16_bf16, 2, uint16_t, 2, uint16_t, narrow_bf16(widen_f16(x)))
#endif

LOOP(bf16_f32, 2, uint16_t, 4, uint32_t, (uint32_t)x << 16)
LOOP(bf16_f16, 2, uint16_t, 2, uint16_t, narrow_f16((uint32_t)x << 16))

typedef void (*loop_fn)(const char *, char *, Py_ssize_t);
static const loop_fn LOOPS[3][3] = {
    /* to:  float32  float16  bfloat16 */
    {NULL, f32_f16, f32_bf16},     /* from float32 */
    {f16_f32, NULL, f16_bf16},     /* from float16 */
    {bf16_f32, bf16_f16, NULL},    /* from bfloat16 */
};

static PyObject *cast(PyObject *self, PyObject *args)
{
    int s, d;
    Py_buffer in, out;
    if (!PyArg_ParseTuple(args, "iiy*w*", &s, &d, &in, &out))
        return NULL;
    PyObject *result = NULL;
    if (s < 0 || s > 2 || d < 0 || d > 2 || LOOPS[s][d] == NULL) {
        PyErr_Format(PyExc_ValueError, "no cast from kind %d to kind %d", s, d);
    } else if (in.len % SIZE[s] || out.len != in.len / SIZE[s] * SIZE[d]) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the element counts");
    } else if (!PyBuffer_IsContiguous(&in, 'C') || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "buffers must be contiguous");
    } else if ((char *)in.buf < (char *)out.buf + out.len && (char *)out.buf < (char *)in.buf + in.len) {
        PyErr_SetString(PyExc_ValueError, "buffers must not overlap");
    } else {
        loop_fn loop = LOOPS[s][d];
        Py_ssize_t n = in.len / SIZE[s];
        Py_BEGIN_ALLOW_THREADS
        loop((const char *)in.buf, (char *)out.buf, n);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"cast", cast, METH_VARARGS,
     "cast(src_kind, dst_kind, source, destination): kinds 0 float32, 1 float16, 2 bfloat16."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcast",
    "Float casts with torch's rounding, compiled (optional; see cast_kernels.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastcast(void) { return PyModule_Create(&module); }
