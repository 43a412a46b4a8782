/* The CPU's fp32 FMA peak: 12 independent chains of fused multiply-adds per thread, all in registers, on the
 * widest vectors the build targets (512-bit with AVX-512, 256-bit with AVX2 + FMA).
 * It bounds every GEMM: docs/performance.md compares BLAS's and oneDNN's matmul throughput with it.
 *
 *   gcc -O2 -march=native -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && OMP_NUM_THREADS=2 /tmp/fma_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define ADD _mm512_add_ps
#define FMADD _mm512_fmadd_ps
static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define ADD _mm256_add_ps
#define FMADD _mm256_fmadd_ps
static float hsum(vec v) {
    float x[8];
    _mm256_storeu_ps(x, v);
    return x[0] + x[1] + x[2] + x[3] + x[4] + x[5] + x[6] + x[7];
}
#else
#error "build with -march=native on a CPU with AVX-512 or AVX2 + FMA"
#endif

#define FMA(a) a = FMADD(a, b, c)

int main(void) {
    const long iters = 200000000;
    double best = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        float sink = 0.0f;
        double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
        {
            vec b = SET1(1.0000001f), c = SET1(1e-8f);
            vec a0 = SET1(0), a1 = SET1(1), a2 = SET1(2), a3 = SET1(3), a4 = SET1(4), a5 = SET1(5);
            vec a6 = SET1(6), a7 = SET1(7), a8 = SET1(8), a9 = SET1(9), a10 = SET1(10), a11 = SET1(11);
            for (long i = 0; i < iters; i++) {
                FMA(a0); FMA(a1); FMA(a2); FMA(a3); FMA(a4); FMA(a5);
                FMA(a6); FMA(a7); FMA(a8); FMA(a9); FMA(a10); FMA(a11);
            }
            vec s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));
            s = ADD(s, ADD(ADD(a8, a9), ADD(a10, a11)));
            sink += hsum(s);  /* keeps the chains live */
        }
        double seconds = omp_get_wtime() - start;
        double flops = 2.0 * LANES * 12 * (double)iters * omp_get_max_threads();
        if (flops / seconds > best) best = flops / seconds;
        printf("%.1f GFLOP/s (checksum %g)\n", flops / seconds / 1e9, sink);
    }
    printf("peak %.1f GFLOP/s on %d threads (%d-bit vectors)\n", best / 1e9, omp_get_max_threads(), 32 * LANES);
    return 0;
}
