/* The decoder's last per-pixel steps fused into one pass: the photo's bilinear sample from its
 * 8-bit neighbour table, the blend with the refinement's colour, the clamp, and the frame's
 * layout (rows of RGB pixels), written as floats or as 8-bit levels.
 *
 * ONNX Runtime runs these as ~30 nodes per row band (a gather, a transpose and a split of the
 * 8-bit taps, four casts, a dozen products and sums, the blend, a transpose to RGB pixels, a
 * clamp, a concat), each a pass over memory. Here each pixel is read once and written once
 * (runtime/composite.py says how the decoder's graph is cut for it).
 *
 * Every operation is the graph's, in the graph's order and in float32 (models/sampling.py,
 * sample_table; models/decoder.py, Decoder._render_gather): the build turns off contraction
 * into fused multiply-adds (setup.py), so the frames are the ONNX graph's to the bit.
 *
 * Loaded with ctypes (runtime/composite.py), which releases the GIL while it runs: the
 * decoder's workers composite their frames side by side. The module init only makes the
 * shared library a well-formed extension module for the build. */
#include <Python.h>
#include <math.h>
#include <stdint.h>

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

/* The levels 0..255 as floats: a load from this table is faster than a conversion of each of
 * a pixel's 12 taps (cvtsi2ss): 1.19 -> 0.94 ms a 256-px frame on the Intel Xeon. */
#define L4(n) (float)(n), (float)(n + 1), (float)(n + 2), (float)(n + 3)
#define L16(n) L4(n), L4(n + 4), L4(n + 8), L4(n + 12)
#define L64(n) L16(n), L16(n + 16), L16(n + 32), L16(n + 48)
static const float LEVEL[256] = {L64(0), L64(64), L64(128), L64(192)};

/* One pixel: the frame's three values in [0, 1] (before the clamp's upper bound is applied to
 * levels: the caller clamps). The table's row y*w+x holds the levels at (y, x), (y, x+1),
 * (y+1, x), (y+1, x+1), three channels each (neighbour_table). */
static inline void pixel(const uint8_t *table, int w, int h, float xs, float ys,
                         const float *colour, long plane, float alpha, float out[3]) {
    const float scale = 1.0f / 255.0f;
    /* clamped to the border as the graph's Clip does; written so that a NaN lands on 0: the
     * index below must stay inside the table whatever the head gave */
    float x = xs > 0.0f ? xs : 0.0f, y = ys > 0.0f ? ys : 0.0f;
    x = x < (float)(w - 1) ? x : (float)(w - 1);
    y = y < (float)(h - 1) ? y : (float)(h - 1);
    /* x, y >= 0 here: truncation is the floor, and needs no libm call (floorf is one on x86-64
     * before SSE4.1) */
    float x0 = (float)(int32_t)x, y0 = (float)(int32_t)y;
    float wx = x - x0, wy = y - y0;
    long idx = (long)(int32_t)(y0 * (float)w + x0);
    float mx = (1.0f - wx) * scale;
    wx = wx * scale;
    float my = 1.0f - wy;
    float w00 = mx * my, w01 = wx * my, w10 = mx * wy, w11 = wx * wy;
    const uint8_t *t = table + idx * 12;
    for (int c = 0; c < 3; c++) {
        float top = LEVEL[t[c]] * w00 + LEVEL[t[3 + c]] * w01;
        float bottom = LEVEL[t[6 + c]] * w10 + LEVEL[t[9 + c]] * w11;
        float v = top + bottom;
        float f = v + (colour[c * plane] - v) * alpha;
        f = f > 0.0f ? f : 0.0f; /* a NaN (none in a finite graph) to 0, as the levels need */
        out[c] = f < 1.0f ? f : 1.0f;
    }
}

/* `pixels` pixels: xs, ys, alpha [pixels], colour [3, pixels] (planar), out [pixels, 3]. */
EXPORT void edgetalk_composite_floats(const uint8_t *table, int w, int h, const float *xs,
                                      const float *ys, const float *colour, const float *alpha,
                                      long pixels, float *out) {
    for (long p = 0; p < pixels; p++) {
        pixel(table, w, h, xs[p], ys[p], colour + p, pixels, alpha[p], out + 3 * p);
    }
}

/* The same frames as 8-bit levels, rounded half up as runtime/scheduler.py's to_uint8 does:
 * (clamp(f, 0, 1) * 255 + 0.5), truncated. */
EXPORT void edgetalk_composite_levels(const uint8_t *table, int w, int h, const float *xs,
                                      const float *ys, const float *colour, const float *alpha,
                                      long pixels, uint8_t *out) {
    float f[3];
    for (long p = 0; p < pixels; p++) {
        pixel(table, w, h, xs[p], ys[p], colour + p, pixels, alpha[p], f);
        for (int c = 0; c < 3; c++) {
            out[3 * p + c] = (uint8_t)(f[c] * 255.0f + 0.5f);
        }
    }
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_composite",
    .m_doc = NULL,
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__composite(void) { return PyModule_Create(&module); }
