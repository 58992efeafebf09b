/* Plain C reference for the cd7_cart population solve: one subject at a time per thread
 * (OpenMP over subjects), Dormand-Prince 5(4) with the same error norm, controller, events and
 * dense output as carkin's ensemble solver, so only the implementation differs.
 *
 * Built and run by benchmarks/ensemble_throughput.py:
 *   cc -O3 -march=native -fopenmp dopri5_cd7.c -o dopri5_cd7 -lm
 *   dopri5_cd7 INPUT OUTPUT
 * INPUT (float64, little-endian): header n, n_times, n_doses, rtol, atol, dt0, max_steps, phi;
 * times[n_times]; then per subject: 18 parameters (order of PARAMS below), CD7N0, y0[6],
 * dose_times[n_doses], dose_amounts[n_doses] (already in the dose state's unit, cells/uL).
 * OUTPUT: per subject ys[n_times][6], then ok[n], steps[n]; the solve's wall time is printed.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

enum { RHO, K_A, K_LD, G_INF, K_C, K_EM, A_M, K_EX, D_E, D_M, D_X, K_KILL, KM_KILL, K_FR, R_T, K_T, S_N, R_N,
       N_PAR };
#define NS 6
#define SAVES_PER_STEP 4

typedef struct { double p[N_PAR]; double n0, phi; } Subject;

static void field(double t, const double *y, const Subject *s, double *dy) {
    const double *p = s->p;
    double e = y[0], m = y[1], x = y[2], b = y[3], r = y[4], n = y[5];
    double car = e + m + x;
    double antigen = b + n + s->phi * car;
    double stim = antigen / (p[K_A] + antigen);
    double window = p[G_INF] + (1.0 - p[G_INF]) * exp(-p[K_LD] * t);
    double density = 1.0 / (1.0 + car / p[K_C]);
    double growth = p[RHO] * window * stim * density;
    double loss = p[D_E] + p[K_EM] + p[K_EX] * stim + p[K_FR] * s->phi * car;
    double kill = p[K_KILL] * e / (p[KM_KILL] + b + n);
    double tgrowth = p[R_T] * (1.0 - (b + r) / p[K_T]);
    dy[0] = (growth - loss) * e + p[A_M] * stim * m;
    dy[1] = p[K_EM] * e - (p[A_M] * stim + p[D_M]) * m;
    dy[2] = p[K_EX] * stim * e - p[D_X] * x;
    dy[3] = (tgrowth - kill) * b;
    dy[4] = tgrowth * r;
    dy[5] = (p[S_N] * s->n0 + p[R_N] * n) * (1.0 - n / s->n0) - kill * n;
}

static const double C[7] = {0.0, 1.0 / 5, 3.0 / 10, 4.0 / 5, 8.0 / 9, 1.0, 1.0};
static const double A[7][6] = {
    {0},
    {1.0 / 5},
    {3.0 / 40, 9.0 / 40},
    {44.0 / 45, -56.0 / 15, 32.0 / 9},
    {19372.0 / 6561, -25360.0 / 2187, 64448.0 / 6561, -212.0 / 729},
    {9017.0 / 3168, -355.0 / 33, 46732.0 / 5247, 49.0 / 176, -5103.0 / 18656},
    {35.0 / 384, 0.0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784, 11.0 / 84},
};
static const double E[7] = {71.0 / 57600, 0.0, -71.0 / 16695, 71.0 / 1920, -17253.0 / 339200, 22.0 / 525, -1.0 / 40};
static const double D[7] = {-12715105075.0 / 11282082432, 0.0, 87487479700.0 / 32700410799,
                            -10690763975.0 / 1880347072, 701980252875.0 / 199316789632,
                            -1453857185.0 / 822651844, 69997945.0 / 29380423};

/* One subject: returns accepted+rejected step count, or -1 on failure. */
static long solve(const Subject *s, const double *y0, const double *dt, const double *da, int nd,
                  const double *times, int nt, double rtol, double atol, double dt0, long max_steps,
                  double *out) {
    double y[NS], k[7][NS], yi[NS], ynew[NS], t = dt[0], h = dt0;
    double t_end = times[nt - 1] > dt[nd - 1] ? times[nt - 1] : dt[nd - 1];
    long steps = 0, budget = max_steps * (nd + 1);
    int j = 0, ev = 0;
    for (int i = 0; i < NS; i++) y[i] = y0[i];
    while (j < nt && times[j] < t) j++;  /* earlier times: baseline, written by the caller */
    for (;;) {
        if (ev < nd && t >= dt[ev]) { y[0] += da[ev]; ev++; continue; }
        if (ev >= nd && t >= t_end) break;
        double t_stop = ev < nd ? dt[ev] : t_end;
        if (t_stop > t_end) t_stop = t_end;
        double h_eff = h < t_stop - t ? h : t_stop - t;
        if (j + SAVES_PER_STEP < nt && times[j + SAVES_PER_STEP] - t < h_eff) h_eff = times[j + SAVES_PER_STEP] - t;
        int lands = h_eff >= t_stop - t;
        for (int st = 0; st < 7; st++) {
            for (int i = 0; i < NS; i++) {
                double acc = 0.0;
                for (int q = 0; q < st; q++) acc += A[st][q] * h_eff * k[q][i];
                yi[i] = y[i] + acc;
            }
            field(t + C[st] * h_eff, yi, s, k[st]);
            if (st == 6) for (int i = 0; i < NS; i++) ynew[i] = yi[i];
        }
        double err = 0.0;
        int finite = 1;
        for (int i = 0; i < NS; i++) {
            double e = 0.0;
            for (int q = 0; q < 7; q++) e += E[q] * k[q][i];
            e *= h_eff;
            double sc = atol + rtol * fmax(fabs(y[i]), fabs(ynew[i]));
            err += (e / sc) * (e / sc);
            finite &= isfinite(ynew[i]);
        }
        err = sqrt(err / NS);
        finite &= isfinite(err);
        steps++;
        int accept = finite && err <= 1.0;
        double factor = err == 0.0 ? 10.0 : 0.9 * pow(err, -0.2);
        if (!finite) factor = 0.2;
        factor = fmin(fmax(factor, 0.2), accept ? 10.0 : 1.0);
        if (accept) {
            double t_new = lands ? t_stop : t + h_eff;
            for (int m = 0; m < SAVES_PER_STEP && j < nt && times[j] < t_new; m++, j++) {
                double th = (times[j] - t) / h_eff, th1 = 1.0 - th;
                for (int i = 0; i < NS; i++) {
                    double ydiff = ynew[i] - y[i], bspl = h_eff * k[0][i] - ydiff;
                    double r4 = ydiff - h_eff * k[6][i] - bspl, r5 = 0.0;
                    for (int q = 0; q < 7; q++) r5 += D[q] * k[q][i];
                    r5 *= h_eff;
                    out[j * NS + i] = y[i] + th * (ydiff + th1 * (bspl + th * (r4 + th1 * r5)));
                }
            }
            for (int i = 0; i < NS; i++) y[i] = ynew[i];
            h = h_eff < h ? fmax(h, h_eff * factor) : h_eff * factor;
            t = t_new;
        } else {
            h = h_eff * factor;
        }
        if (!finite || steps > budget || h < 1e-14 * (1.0 + fabs(t))) return -1;
    }
    for (; j < nt; j++)
        for (int i = 0; i < NS; i++) out[j * NS + i] = y[i];
    return steps;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 2; }
    double hdr[8];
    if (fread(hdr, sizeof(double), 8, f) != 8) { fprintf(stderr, "short header\n"); return 2; }
    long n = (long)hdr[0];
    int nt = (int)hdr[1], nd = (int)hdr[2];
    double rtol = hdr[3], atol = hdr[4], dt0 = hdr[5], phi = hdr[7];
    long max_steps = (long)hdr[6];
    long rec = N_PAR + 1 + NS + 2 * nd;
    double *times = malloc(sizeof(double) * nt), *in = malloc(sizeof(double) * rec * n);
    double *out = malloc(sizeof(double) * n * nt * NS), *ok = malloc(sizeof(double) * n);
    double *steps = malloc(sizeof(double) * n);
    if (fread(times, sizeof(double), nt, f) != (size_t)nt || fread(in, sizeof(double), rec * n, f) != (size_t)(rec * n)) {
        fprintf(stderr, "short input\n");
        return 2;
    }
    fclose(f);
    double t0 = omp_get_wtime();
#pragma omp parallel for schedule(dynamic, 16)
    for (long s = 0; s < n; s++) {
        const double *r = in + s * rec;
        Subject sub;
        for (int q = 0; q < N_PAR; q++) sub.p[q] = r[q];
        sub.n0 = r[N_PAR];
        sub.phi = phi;
        const double *y0 = r + N_PAR + 1, *dt = y0 + NS, *da = dt + nd;
        double *o = out + s * nt * NS;
        for (int j = 0; j < nt; j++)
            for (int i = 0; i < NS; i++) o[j * NS + i] = NAN;
        long k = solve(&sub, y0, dt, da, nd, times, nt, rtol, atol, dt0, max_steps, o);
        ok[s] = k >= 0;
        steps[s] = (double)k;
    }
    double elapsed = omp_get_wtime() - t0;
    FILE *g = fopen(argv[2], "wb");
    fwrite(out, sizeof(double), n * nt * NS, g);
    fwrite(ok, sizeof(double), n, g);
    fwrite(steps, sizeof(double), n, g);
    fclose(g);
    printf("%.6f\n", elapsed);
    return 0;
}
