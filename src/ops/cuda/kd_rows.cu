// The KD row kernel: the CUDA twin of src/kd/kernel.rs `loss_rows_in_place` (per-row math in
// src/kd/divergence.rs `divergence_row` and `cross_entropy_row`). One block per row of logits.
//
// Per row i with weight w_i != 0 (rows with weight 0 get a zero gradient and zero losses):
//   CE_i = lse(s) - s[label]                                  (temperature 1)
//   D_i  = D(p || q), p = softmax(t / T), q = softmax(s / T)  (fkl rkl jsd tvd skl srkl)
//   out[i] = (CE_i, D_i, status); the weighted sums and the T^2 / CE mix are folded by the
//   caller into ce_coef and kd_coef exactly as on the CPU:
//   d/ds = w_i kd_coef (1/T) dD/db + w_i ce_coef (softmax(s) - onehot(label)),
//   written OVER the student logits when want_grad (the driver owns that buffer).
// Arithmetic is f64 per element, as the CPU kernel's; the row is re-read from global memory per
// pass (max, normalisers, divergence sums, gradient) instead of keeping four f64 scratch rows.
// status: 0 ok, 1 teacher row without a finite max, 2 student row without one (the CPU errors).

#include "common.cuh"

#define DIV_FKL 0
#define DIV_RKL 1
#define DIV_JSD 2
#define DIV_TVD 3
#define DIV_SKL 4
#define DIV_SRKL 5

#define LOG_PROB_FLOOR (-1e30)
#define M_MIN 1e-290

__device__ __forceinline__ double sel(bool c, double x) { return c ? x : 0.0; }
__device__ __forceinline__ double sgn(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0); }

// log(wp p + wq q) from log p and log q, where the mixture underflows.
__device__ __forceinline__ double log_mix(double lwp, double lwq, double lp, double lq) {
    double a = lwp + lp, b = lwq + lq, hi = fmax(a, b);
    return hi + log(exp(a - hi) + exp(b - hi));
}

struct Row {
    int div;
    double param;  // beta of jsd, alpha of skl / srkl
    double inv_t, mt, ms, lse_t, lse_s, izt, izs;
};

// The per-element quantities of a divergence: (a, b) are the two terms summed over the row, and
// the gradient needs them again (see the table in divergence.rs).
struct Elem {
    double p, q, lp, lq, a, b;
};

__device__ __forceinline__ Elem element(const Row& r, float tj, float sj) {
    Elem e;
    e.p = exp(((double)tj - r.mt) * r.inv_t) * r.izt;
    e.q = exp(((double)sj - r.ms) * r.inv_t) * r.izs;
    double l = (double)tj * r.inv_t - r.lse_t;
    e.lp = l > LOG_PROB_FLOOR ? l : LOG_PROB_FLOOR;
    e.lq = (double)sj * r.inv_t - r.lse_s;
    const double p = e.p, q = e.q;
    switch (r.div) {
    case DIV_FKL:
        e.a = sel(p > 0.0, p * (e.lp - e.lq));
        e.b = 0.0;
        break;
    case DIV_RKL:
        e.a = sel(q > 0.0, q * (e.lq - e.lp));
        e.b = 0.0;
        break;
    case DIV_TVD:
        e.a = fabs(q - p);
        e.b = q * 0.5 * sgn(q - p);
        break;
    case DIV_JSD: {  // a: p log(p/m), b: log(q/m) (q log(q/m) is summed)
        double beta = r.param, m = beta * p + (1.0 - beta) * q;
        double lm = m < M_MIN ? log_mix(log(beta), log(1.0 - beta), e.lp, e.lq) : log(m);
        e.b = e.lq - lm;
        e.a = sel(p > 0.0, p * (e.lp - lm));
        break;
    }
    case DIV_SKL: {  // a: p log(p/m), b: p/m
        double alpha = r.param, m = alpha * p + (1.0 - alpha) * q;
        if (m < M_MIN) {
            double x = e.lp - log_mix(log(alpha), log(1.0 - alpha), e.lp, e.lq);
            e.b = sel(p > 0.0, exp(x));
            e.a = sel(p > 0.0, p * x);
        } else {
            double x = e.lp - log(m);
            e.b = sel(p > 0.0, p / m);
            e.a = sel(p > 0.0, p * x);
        }
        break;
    }
    default: {  // DIV_SRKL; a: log(q/m), b: q/m
        double alpha = r.param, m = (1.0 - alpha) * p + alpha * q;
        if (m < M_MIN) {
            double x = e.lq - log_mix(log(1.0 - alpha), log(alpha), e.lp, e.lq);
            e.a = x;
            e.b = sel(q > 0.0, exp(x));
        } else {
            e.a = e.lq - log(m);
            e.b = sel(q > 0.0, q / m);
        }
        break;
    }
    }
    return e;
}

// The two row sums each divergence needs, from one element.
__device__ __forceinline__ void sums_of(int div, const Elem& e, double* s0, double* s1) {
    switch (div) {
    case DIV_JSD: *s0 += e.a; *s1 += sel(e.q > 0.0, e.q * e.b); break;  // KL(p||m), KL(q||m)
    case DIV_SKL: *s0 += e.a; *s1 += e.q * e.b; break;                   // D, sum q p/m
    case DIV_SRKL: *s0 += sel(e.q > 0.0, e.q * e.a); *s1 += e.q * e.b; break;  // D, sum q^2/m
    default: *s0 += e.a; *s1 += e.b; break;  // fkl, rkl: D; tvd: 2D, sum q sign/2
    }
}

// dD/db_j from the element and the row sums (see divergence.rs).
__device__ __forceinline__ double grad_of(const Row& r, const Elem& e, double d, double s0,
                                          double s1) {
    const double p = e.p, q = e.q;
    switch (r.div) {
    case DIV_FKL: return q - p;
    case DIV_RKL: return sel(q > 0.0, q * (e.lq - e.lp - d));
    case DIV_TVD: return q * (0.5 * sgn(q - p) - s1);
    case DIV_JSD: return (1.0 - r.param) * sel(q > 0.0, q * (e.b - s1));
    case DIV_SKL: return (1.0 - r.param) * q * (s1 - e.b);
    default: return sel(q > 0.0, q * (e.a - d - r.param * (e.b - s1)));
    }
}

extern "C" __global__ void pocl_kd_rows(
    float* s,                    // [rows, s_stride]: student logits in, dL/dlogits out
    const float* t,              // [rows, t_stride]: teacher logits (ignored unless has_teacher)
    const float* w,              // [rows]: row weights
    const unsigned int* labels,  // [rows] (ignored unless has_labels)
    double* out,                 // [rows, 3]: CE, D, status
    int v, long long s_stride, long long t_stride, int div, double param, double inv_t,
    double ce_coef, double kd_coef, int has_teacher, int has_labels, int want_grad) {
    __shared__ double shd[32];
    __shared__ float shf[32];
    const long long i = blockIdx.x;
    float* sr = s + i * s_stride;
    const float* tr = t + i * t_stride;
    double* o = out + 3 * i;
    const double wi = (double)w[i];
    if (wi == 0.0) {
        if (want_grad)
            for (int j = threadIdx.x; j < v; j += blockDim.x) sr[j] = 0.0f;
        if (threadIdx.x == 0) o[0] = o[1] = o[2] = 0.0;
        return;
    }
    const bool kd = has_teacher && kd_coef != 0.0;
    const unsigned int label = has_labels ? labels[i] : 0u;

    // Maxima (the CPU checks the teacher's first).
    float mt = -INFINITY, ms = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        ms = fmaxf(ms, sr[j]);
        if (kd) mt = fmaxf(mt, tr[j]);
    }
    ms = block_max(ms, shf);
    if (kd) mt = block_max(mt, shf);
    if ((kd && !isfinite(mt)) || ((kd || has_labels) && !isfinite(ms))) {
        if (threadIdx.x == 0) {
            o[0] = o[1] = 0.0;
            o[2] = (kd && !isfinite(mt)) ? 1.0 : 2.0;
        }
        return;
    }
    const double s_label = has_labels ? (double)sr[label] : 0.0;  // read before it is overwritten

    // Normalisers: zt, zs at temperature T for the divergence, z1 at T = 1 for CE.
    double zt = 0.0, zs = 0.0, z1 = 0.0;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        double x = (double)sr[j] - (double)ms;
        if (kd) {
            zt += exp(((double)tr[j] - (double)mt) * inv_t);
            zs += exp(x * inv_t);
        }
        if (has_labels) z1 += exp(x);
    }
    if (kd) {
        zt = block_sum(zt, shd);
        zs = block_sum(zs, shd);
    }
    if (has_labels) z1 = block_sum(z1, shd);

    Row r;
    r.div = div;
    r.param = param;
    r.inv_t = inv_t;
    r.mt = (double)mt;
    r.ms = (double)ms;
    r.lse_t = r.mt * inv_t + log(zt);
    r.lse_s = r.ms * inv_t + log(zs);
    r.izt = exp(-(r.lse_t - r.mt * inv_t));
    r.izs = exp(-(r.lse_s - r.ms * inv_t));

    double d = 0.0, s0 = 0.0, s1 = 0.0;
    if (kd) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            Elem e = element(r, tr[j], sr[j]);
            sums_of(div, e, &s0, &s1);
        }
        s0 = block_sum(s0, shd);
        s1 = block_sum(s1, shd);
        switch (div) {
        case DIV_TVD: d = 0.5 * s0; break;
        case DIV_JSD: d = param * s0 + (1.0 - param) * s1; break;
        default: d = s0; break;
        }
    }
    const double lse1 = (double)ms + log(z1);
    if (threadIdx.x == 0) {
        o[0] = has_labels ? lse1 - s_label : 0.0;
        o[1] = kd ? d : 0.0;
        o[2] = 0.0;
    }
    if (!want_grad) return;

    const double c_kd = wi * kd_coef * inv_t;  // the chain factor 1/T of b = s/T
    const bool ce_grad = has_labels && ce_coef != 0.0;
    const double c_ce = wi * ce_coef;
    const double cz = c_ce * exp(-(lse1 - (double)ms));
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float sj = sr[j];
        float g = 0.0f;
        if (kd) {
            Elem e = element(r, tr[j], sj);
            g += (float)(c_kd * grad_of(r, e, d, s0, s1));
        }
        if (ce_grad) {
            g += (float)(cz * exp((double)sj - (double)ms));
            if ((unsigned int)j == label) g -= (float)c_ce;
        }
        sr[j] = g;
    }
}
