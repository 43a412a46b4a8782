/* The CPU's fp32 FMA peak: 12 independent chains of 512-bit fused multiply-adds per thread, all in registers.
 * It bounds every GEMM: docs/performance.md compares BLAS's and oneDNN's matmul throughput with it.
 *
 *   gcc -O2 -mavx512f -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && OMP_NUM_THREADS=2 /tmp/fma_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define FMA(a) a = _mm512_fmadd_ps(a, b, c)

int main(void) {
    const long iters = 200000000;
    double best = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        float sink = 0.0f;
        double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
        {
            __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-8f);
            __m512 a0 = _mm512_set1_ps(0), a1 = _mm512_set1_ps(1), a2 = _mm512_set1_ps(2), a3 = _mm512_set1_ps(3);
            __m512 a4 = _mm512_set1_ps(4), a5 = _mm512_set1_ps(5), a6 = _mm512_set1_ps(6), a7 = _mm512_set1_ps(7);
            __m512 a8 = _mm512_set1_ps(8), a9 = _mm512_set1_ps(9), a10 = _mm512_set1_ps(10), a11 = _mm512_set1_ps(11);
            for (long i = 0; i < iters; i++) {
                FMA(a0); FMA(a1); FMA(a2); FMA(a3); FMA(a4); FMA(a5);
                FMA(a6); FMA(a7); FMA(a8); FMA(a9); FMA(a10); FMA(a11);
            }
            __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                     _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
            s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
            sink += _mm512_reduce_add_ps(s);  /* keeps the chains live */
        }
        double seconds = omp_get_wtime() - start;
        double flops = 2.0 * 16 * 12 * (double)iters * omp_get_max_threads();
        if (flops / seconds > best) best = flops / seconds;
        printf("%.1f GFLOP/s (checksum %g)\n", flops / seconds / 1e9, sink);
    }
    printf("peak %.1f GFLOP/s on %d threads\n", best / 1e9, omp_get_max_threads());
    return 0;
}
