// Runs pocl's CUDA kernels on the host, one thread per block (POCL_HOST_EMULATION in
// common.cuh), for tests/cuda_host_emulation.rs. Reads a job from stdin, writes results to stdout.
//
// kd job:    "kd rows v div param inv_t ce_coef kd_coef has_teacher has_labels want_grad"
//            then rows weights, rows labels, rows*v student logits, rows*v teacher logits.
//            Prints per row "ce kd status", then rows*v gradient values (or the logits).
// adamw job: "adamw n has_grad b1 b2 bc1 bc2 eps lr decay scale" then n p, n m, n v, n g.
//            Prints n p, n m, n v; then "sq" and the sum of squares of the gradient.
// norm job:  "norm rows d center eps" then rows*d x, d w, d b, rows*d dy.
//            Prints rows*d y, then (rows + 2)*d backward output (dx; dw; db).
// softmax job: "softmax b h tq tk scale" then b*h*tq*tk scores, b*tq*tk bias, b*h*tq*tk dp.
//            Prints the probabilities, then ds.
// embed job: "embed vocab d n u" then u used rows, u + 1 starts, n token order, n*d dy.
//            Prints vocab*d dw.
// act job:   "act kind n" then n x, n dy. Prints n y, then n dx.
#include <stdio.h>
#include <string.h>
#include <vector>
#include "../../src/ops/cuda/kd_rows.cu"
#include "../../src/ops/cuda/optim.cu"
#include "../../src/ops/cuda/norm.cu"
#include "../../src/ops/cuda/softmax.cu"
#include "../../src/ops/cuda/embed.cu"
#include "../../src/ops/cuda/act.cu"

static double rd() {
    char buf[64];
    if (scanf("%63s", buf) != 1) { fprintf(stderr, "short input\n"); exit(2); }
    return strtod(buf, nullptr);
}

int main() {
    char job[16];
    if (scanf("%15s", job) != 1) return 2;
    if (!strcmp(job, "kd")) {
        int rows = (int)rd(), v = (int)rd(), div = (int)rd();
        double param = rd(), inv_t = rd(), ce = rd(), kd = rd();
        int ht = (int)rd(), hl = (int)rd(), wg = (int)rd();
        std::vector<float> w(rows), s((size_t)rows * v), t((size_t)rows * v);
        std::vector<unsigned int> l(rows);
        std::vector<double> out(3 * (size_t)rows);
        for (auto& x : w) x = (float)rd();
        for (auto& x : l) x = (unsigned int)rd();
        for (auto& x : s) x = (float)rd();
        for (auto& x : t) x = (float)rd();
        for (int i = 0; i < rows; i++) {
            blockIdx.x = i;
            pocl_kd_rows(s.data(), t.data(), w.data(), l.data(), out.data(), v, v, v, div,
                         param, inv_t, ce, kd, ht, hl, wg);
        }
        for (int i = 0; i < rows; i++)
            printf("%.17g %.17g %.17g\n", out[3 * i], out[3 * i + 1], out[3 * i + 2]);
        for (auto x : s) printf("%.9g\n", x);
    } else if (!strcmp(job, "adamw")) {
        long long n = (long long)rd();
        int hg = (int)rd();
        double b1 = rd(), b2 = rd(), bc1 = rd(), bc2 = rd(), eps = rd(), lr = rd(), decay = rd(),
               scale = rd();
        std::vector<float> p(n), mv(2 * n), g(n);
        for (auto& x : p) x = (float)rd();
        for (auto& x : mv) x = (float)rd();
        for (auto& x : g) x = (float)rd();
        pocl_adamw_moments(mv.data(), g.data(), n, hg, b1, b2, scale);
        pocl_adamw_apply(p.data(), mv.data(), n, bc1, bc2, eps, lr, decay);
        for (auto x : p) printf("%.9g\n", x);
        for (auto x : mv) printf("%.9g\n", x);
        double part = 0;
        pocl_sum_squares(g.data(), n, &part);
        printf("sq %.17g\n", part);
    } else if (!strcmp(job, "norm")) {
        int rows = (int)rd(), d = (int)rd(), center = (int)rd();
        double eps = rd();
        std::vector<float> x((size_t)rows * d), w(d), b(d), dy((size_t)rows * d),
            y((size_t)rows * d), out((size_t)(rows + 2) * d);
        std::vector<double> stats(2 * (size_t)rows);
        for (auto& v : x) v = (float)rd();
        for (auto& v : w) v = (float)rd();
        for (auto& v : b) v = (float)rd();
        for (auto& v : dy) v = (float)rd();
        for (int r = 0; r < rows; r++) {
            blockIdx.x = r;
            pocl_norm_forward(x.data(), w.data(), b.data(), y.data(), d, center, center, eps);
            pocl_norm_backward_rows(x.data(), w.data(), dy.data(), out.data(), stats.data(), d,
                                    center, eps);
        }
        blockIdx.x = 0;
        pocl_norm_backward_params(x.data(), dy.data(), stats.data(), out.data(), rows, d);
        for (auto v : y) printf("%.9g\n", v);
        for (auto v : out) printf("%.9g\n", v);
    } else if (!strcmp(job, "softmax")) {
        int b = (int)rd(), h = (int)rd(), tq = (int)rd(), tk = (int)rd();
        float scale = (float)rd();
        size_t n = (size_t)b * h * tq * tk;
        std::vector<float> sc(n), bias((size_t)b * tq * tk), dp(n), p(n), ds(n);
        for (auto& v : sc) v = (float)rd();
        for (auto& v : bias) v = (float)rd();
        for (auto& v : dp) v = (float)rd();
        for (int r = 0; r < b * h * tq; r++) {
            blockIdx.x = r;
            pocl_softmax_forward(sc.data(), bias.data(), p.data(), tk, h, tq, scale);
        }
        for (int r = 0; r < b * h * tq; r++) {
            blockIdx.x = r;
            pocl_softmax_backward(p.data(), dp.data(), ds.data(), tk, scale);
        }
        for (auto v : p) printf("%.9g\n", v);
        for (auto v : ds) printf("%.9g\n", v);
    } else if (!strcmp(job, "embed")) {
        int vocab = (int)rd(), d = (int)rd(), n = (int)rd(), u = (int)rd();
        std::vector<unsigned int> rows(u), starts(u + 1), order(n);
        std::vector<float> dy((size_t)n * d), dw((size_t)vocab * d, 0.0f);
        for (auto& v : rows) v = (unsigned int)rd();
        for (auto& v : starts) v = (unsigned int)rd();
        for (auto& v : order) v = (unsigned int)rd();
        for (auto& v : dy) v = (float)rd();
        for (int r = 0; r < u; r++) {
            blockIdx.x = r;
            pocl_embedding_grad(dy.data(), order.data(), starts.data(), rows.data(), d,
                                dw.data());
        }
        for (auto v : dw) printf("%.9g\n", v);
    } else if (!strcmp(job, "act")) {
        int kind = (int)rd();
        long long n = (long long)rd();
        std::vector<float> x(n), dy(n), y(n), dx(n);
        for (auto& v : x) v = (float)rd();
        for (auto& v : dy) v = (float)rd();
        pocl_act_forward(x.data(), y.data(), n, kind);
        pocl_act_backward(x.data(), dy.data(), dx.data(), n, kind);
        for (auto v : y) printf("%.9g\n", v);
        for (auto v : dx) printf("%.9g\n", v);
    } else {
        return 2;
    }
    return 0;
}
