/* Eval-callback filter and router-input capture for llama.cpp's scheduler
 * (ggml_backend_sched_eval_callback).
 *
 * llama.cpp asks the eval callback about EVERY graph node (ask=true) before computing it.
 * Crossing into Python for each node costs ~3 us, a large share of a small model's decode
 * step. This filter answers those questions in C by comparing the node name's prefix, and
 * forwards only the matching nodes to the Python callback.
 *
 * Capture (decode steps, no in-graph hook): the router nodes `ffn_moe_logits-<il>` are handled
 * here entirely. Asked about one, the filter says yes when Python marked that layer wanted for
 * this step; once it is computed, the node's input (src[1], the normalised hidden states,
 * F32 [n_embd, n_tokens]) is appended with ggml_backend_tensor_get (host or device alike) to
 * row `row_of_layer[il]` of a buffer that Python scores every few steps. No Python runs per
 * layer or per step. An input of another type or shape sets `error` and is not copied (Python then leaves
 * capture off). No ggml headers: the field offsets inside struct ggml_tensor are passed in (and
 * checked) from Python.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef bool (*swapmoe_eval_cb)(void *tensor, bool ask, void *user_data);
typedef void (*swapmoe_tensor_get)(const void *tensor, void *data, size_t offset, size_t size);

struct swapmoe_filter {
    size_t name_offset;      /* offsetof(struct ggml_tensor, name) */
    const char *prefix;      /* e.g. "ffn_moe_logits-" */
    size_t prefix_len;
    swapmoe_eval_cb forward; /* the Python callback */
    void *forward_ud;
    /* capture (active while `capture` is non-zero) */
    int32_t capture;
    const char *cap_prefix;  /* "ffn_moe_logits-" */
    size_t cap_prefix_len;
    size_t src_offset;       /* offsetof(struct ggml_tensor, src) */
    size_t type_offset;      /* offsetof(struct ggml_tensor, type) */
    size_t ne_offset;        /* offsetof(struct ggml_tensor, ne) */
    size_t nb_offset;        /* offsetof(struct ggml_tensor, nb) */
    swapmoe_tensor_get tensor_get;
    int32_t n_layer_map;     /* entries of row_of_layer */
    const int32_t *row_of_layer; /* block index -> row, -1 for layers without a router */
    const uint8_t *want;     /* per row: capture this layer in this step */
    float *buf;              /* [n_rows, max_tok, n_embd] */
    int64_t n_embd;
    int64_t max_tok;
    int32_t *n_tok;          /* per row: tokens captured since Python last read the buffer */
    int32_t error;
    int64_t copy_ns;         /* time spent copying, summed */
};

static int parse_layer(const char *s) {
    int v = 0, any = 0;
    while (*s >= '0' && *s <= '9') {
        v = v * 10 + (*s - '0');
        s++;
        any = 1;
    }
    return any && *s == '\0' ? v : -1;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static bool capture(struct swapmoe_filter *f, char *tensor, const char *name, bool ask) {
    int il = parse_layer(name + f->cap_prefix_len);
    int row = (il >= 0 && il < f->n_layer_map) ? f->row_of_layer[il] : -1;
    if (ask) {
        return row >= 0 && f->want[row];
    }
    if (row < 0) {
        return true;
    }
    char *src = *(char **)(tensor + f->src_offset + sizeof(void *)); /* src[1] */
    const int64_t *ne = (const int64_t *)(src + f->ne_offset);
    const size_t *nb = (const size_t *)(src + f->nb_offset);
    int64_t n = ne[1] * ne[2] * ne[3], at = f->n_tok[row];
    if (*(const int32_t *)(src + f->type_offset) != 0 /* GGML_TYPE_F32 */ || ne[0] != f->n_embd
        || at + n > f->max_tok || nb[0] != sizeof(float) || nb[1] != (size_t)ne[0] * sizeof(float)
        || nb[2] != nb[1] * (size_t)ne[1] || nb[3] != nb[2] * (size_t)ne[2]) {
        f->error = 1;
        return true;
    }
    int64_t t0 = now_ns();
    f->tensor_get(src, f->buf + ((size_t)row * f->max_tok + at) * f->n_embd, 0, (size_t)(n * f->n_embd) * sizeof(float));
    f->copy_ns += now_ns() - t0;
    f->n_tok[row] = (int32_t)(at + n);
    return true;
}

bool swapmoe_filter_eval(void *tensor, bool ask, void *user_data) {
    struct swapmoe_filter *f = (struct swapmoe_filter *)user_data;
    const char *name = (const char *)tensor + f->name_offset;
    if (f->capture && strncmp(name, f->cap_prefix, f->cap_prefix_len) == 0) {
        return capture(f, (char *)tensor, name, ask);
    }
    if (strncmp(name, f->prefix, f->prefix_len) != 0) {
        return !ask; /* not asked for; when not asking, returning true means "keep computing" */
    }
    return f->forward(tensor, ask, f->forward_ud);
}
