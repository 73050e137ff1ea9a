/* The scheduler's per-token work over captured decode steps, in one C call (issue 26).
 *
 * Input: the full routers' logits of G MoE layers x n tokens (numpy's BLAS computes them, one
 * batched matmul over the router inputs the eval filter captured). For every (layer, token) this
 * routes as the full model (the layer's gating spec, routing.py's `route`, step by step in f32),
 * then, in the order numpy's path sums them:
 *   - Eq. 1: scores[row] = scores[row] * decay^n + norms[row] * sum_t decay^(n-1-t) |w| ||x||
 *     (residency/scheduler.py `observe_layers`, f64; the decay powers come from the scheduler, so
 *     the sums are those of its numpy path bit for bit, given the same routing);
 *   - hits: the share of the full model's weight on resident experts (routing.py `hit_shares`), with
 *     the resident set each token ran with (`mask_of_token` indexes `masks`).
 * No Python runs per layer or per token; the decisions (which experts to swap) stay in Python.
 * Compiled into the same shared library as _evalfilter.c; called through ctypes.
 */
#include <math.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { FUNC_SOFTMAX, FUNC_SIGMOID, FUNC_SOFTMAX_WEIGHT, FUNC_SQRT_SOFTPLUS };
enum { SELECT_PROBS, SELECT_LOGITS, SELECT_SIGMOID_LOGITS };

#define MAX_K 64
#define NORM_EPS 6.103515625e-5f /* llama.cpp's clamp of the weight sum (routing.py _NORM_EPS) */

struct swapmoe_score_args {
    int32_t n_group_layers;   /* G */
    int32_t n_tok;            /* n: tokens per layer */
    int32_t n_expert;         /* N */
    int32_t k;                /* experts per token */
    const float *logits;      /* [G, n, N] router logits, router bias not yet added */
    const float *x_norm;      /* [G, n] ||x|| of each router input */
    const int64_t *rows;      /* [G] row of each layer in bias/sel_bias/scores/norms/masks */
    int64_t n_rows;           /* rows of those arrays (every MoE layer) */
    const float *bias;        /* [rows, N] router bias, or NULL */
    const float *sel_bias;    /* [rows, N] selection bias (ranking only), or NULL */
    int32_t func, select, use_sel_bias, norm_w;
    float scale;
    int32_t n_group, n_group_used;
    /* Eq. 1 */
    double *scores;           /* [rows, N], updated in place */
    const double *norms;      /* [rows, N] ||E_i|| */
    const double *decay_tok;  /* [n] decay^(n-1-t): how much of token t's contribution is left at the end */
    double decay_all;         /* decay^n: what is left of the earlier scores */
    /* hits (masks NULL: not counted) */
    const uint8_t *masks;     /* [n_masks, rows, N] resident (1) or not */
    const int32_t *mask_of_token; /* [n] which mask token t ran with */
    double hit_mass;          /* out: summed shares */
    int64_t hit_count;        /* out: shares summed */
    int32_t error;            /* out: 1 when the shapes are out of range (nothing was changed) */
};

/* a ranks before b: larger value first, equal values by lower index (numpy's stable argsort of -v) */
static int before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

/* the k best of v[0..n) into out, best first (insertion into a sorted list of k) */
static void top_k(const float *v, int n, int k, int *out) {
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (m == k && !before(v[i], i, v[out[k - 1]], out[k - 1])) {
            continue;
        }
        int j = m < k ? m++ : k - 1;
        while (j > 0 && before(v[i], i, v[out[j - 1]], out[j - 1])) {
            out[j] = out[j - 1];
            j--;
        }
        out[j] = i;
    }
}

static float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

static void softmax(const float *in, float *out, int n) {
    float mx = in[0];
    for (int i = 1; i < n; i++) mx = in[i] > mx ? in[i] : mx;
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += out[i] = expf(in[i] - mx);
    for (int i = 0; i < n; i++) out[i] /= sum;
}

/* One token of one layer: selected experts and their weights (routing.py `route`). */
static void route_one(const struct swapmoe_score_args *a, const float *lg_in, const float *bias,
                      const float *sel_bias, int *sel_out, float *w_out, float *scratch) {
    const int N = a->n_expert, k = a->k;
    float *lg = scratch, *probs = scratch + N, *rank = scratch + 2 * N; /* (heap: large stack frames are probed) */
    for (int i = 0; i < N; i++) lg[i] = bias ? lg_in[i] + bias[i] : lg_in[i];
    switch (a->func) {
    case FUNC_SOFTMAX: softmax(lg, probs, N); break;
    case FUNC_SIGMOID: for (int i = 0; i < N; i++) probs[i] = sigmoidf_(lg[i]); break;
    case FUNC_SQRT_SOFTPLUS: /* sqrt(logaddexp(0, x)) */
        for (int i = 0; i < N; i++) probs[i] = sqrtf(lg[i] > 0 ? lg[i] + log1pf(expf(-lg[i])) : log1pf(expf(lg[i])));
        break;
    default: memcpy(probs, lg, sizeof(float) * N); break; /* softmax_weight: after selection */
    }
    const float *src = a->select == SELECT_LOGITS ? lg : probs;
    for (int i = 0; i < N; i++) {
        float v = a->select == SELECT_SIGMOID_LOGITS ? sigmoidf_(lg[i]) : src[i];
        rank[i] = a->use_sel_bias && sel_bias ? v + sel_bias[i] : v;
    }
    if (a->n_group > 1) { /* keep the n_group_used groups with the best sum of their top-2 */
        int per = N / a->n_group, top = per < 2 ? per : 2, keep[MAX_K];
        float *gs = scratch + 3 * N;
        for (int g = 0; g < a->n_group; g++) {
            int best[2];
            top_k(rank + g * per, per, top, best);
            gs[g] = top == 2 ? rank[g * per + best[1]] + rank[g * per + best[0]] : rank[g * per + best[0]];
        }
        top_k(gs, a->n_group, a->n_group_used, keep);
        for (int g = 0; g < a->n_group; g++) {
            int kept = 0;
            for (int j = 0; j < a->n_group_used; j++) kept |= keep[j] == g;
            if (!kept) for (int i = 0; i < per; i++) rank[g * per + i] = -INFINITY;
        }
    }
    top_k(rank, N, k, sel_out);
    for (int j = 0; j < k; j++) w_out[j] = probs[sel_out[j]];
    if (a->func == FUNC_SOFTMAX_WEIGHT) {
        float tmp[MAX_K];
        softmax(w_out, tmp, k);
        memcpy(w_out, tmp, sizeof(float) * k);
    }
    if (a->norm_w) {
        float s = 0.0f;
        for (int j = 0; j < k; j++) s += w_out[j];
        s = s > NORM_EPS ? s : NORM_EPS;
        for (int j = 0; j < k; j++) w_out[j] /= s;
    }
    if (a->scale != 0.0f && a->scale != 1.0f) {
        for (int j = 0; j < k; j++) w_out[j] *= a->scale;
    }
}

void swapmoe_score(struct swapmoe_score_args *a) {
    const int G = a->n_group_layers, n = a->n_tok, N = a->n_expert, k = a->k;
    a->error = 0;
    if (N <= 0 || k <= 0 || k > MAX_K || k > N || n <= 0 || G <= 0
        || (a->n_group > 1 && (N % a->n_group || a->n_group_used <= 0 || a->n_group_used > a->n_group
                               || a->n_group_used > MAX_K))) {
        a->error = 1;
        return;
    }
    const double *w_tok = a->decay_tok, keep = a->decay_all;
    double *contrib = malloc(sizeof(double) * N + sizeof(float) * 4 * N);
    float *scratch = (float *)(contrib + N);
    if (contrib == NULL) {
        a->error = 1;
        return;
    }
    int sel[MAX_K];
    float w[MAX_K];
    for (int g = 0; g < G; g++) {
        const int64_t r = a->rows[g];
        const float *bias = a->bias ? a->bias + r * N : NULL;
        const float *sel_bias = a->sel_bias ? a->sel_bias + r * N : NULL;
        memset(contrib, 0, sizeof(double) * N);
        for (int t = 0; t < n; t++) {
            route_one(a, a->logits + ((size_t)g * n + t) * N, bias, sel_bias, sel, w, scratch);
            const float xn = a->x_norm[(size_t)g * n + t];
            float wsum = 0.0f, hsum = 0.0f;
            const uint8_t *m = a->masks ? a->masks + ((size_t)a->mask_of_token[t] * (size_t)a->n_rows + (size_t)r) * N
                                        : NULL;
            for (int j = 0; j < k; j++) {
                float aw = fabsf(w[j]);
                float gate = aw * xn;                       /* f32, as numpy's |w| * x_norm */
                contrib[sel[j]] += (double)gate * w_tok[t];
                wsum += aw;
                if (m && m[sel[j]]) hsum += aw;
            }
            if (m) {
                a->hit_mass += (double)(hsum / (wsum > 1e-30f ? wsum : 1e-30f));
                a->hit_count += 1;
            }
        }
        double *s = a->scores + r * N;
        const double *nrm = a->norms + r * N;
        for (int i = 0; i < N; i++) s[i] = s[i] * keep + contrib[i] * nrm[i];
    }
    free(contrib);
}
