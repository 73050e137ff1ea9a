/* Eval-callback filter and router-input capture for llama.cpp's scheduler
 * (ggml_backend_sched_eval_callback).
 *
 * llama.cpp asks the eval callback about EVERY graph node (ask=true) before computing it.
 * Crossing into Python for each node costs ~3 us, a large share of a small model's decode
 * step. This filter answers those questions in C by comparing the node name's prefix, and
 * forwards only the matching nodes to the Python callback.
 *
 * Capture (decode steps): the router nodes `ffn_moe_logits-<il>` are handled here entirely. Their
 * input (src[1], the normalised hidden states, F32 [n_embd, n_tokens]) goes to slot
 * (step, row_of_layer[il]) of a capture area that Python scores every few steps. Two ways:
 *  - redirect (the default): asked about the router node, the filter points the input tensor (and
 *    every view of it) at its slot of the capture area before anything of that split is computed
 *    (ggml's scheduler asks about all nodes of a split first when the callback needs none), so the
 *    graph itself writes the input there. Nothing is copied, the graph is not split, the device is not
 *    synchronised per layer: on a device the area is a buffer of that device, read once per flush.
 *    `swapmoe_filter_restore` puts every pointer back after the decode (llama.cpp may reuse the
 *    graph). Only where that is safe: a computed node (not a view, not an input copy of another
 *    backend, named with '#') in a buffer whose memory the area shares (host, or a registered device
 *    buffer type); else, or when the view list is full:
 *  - copy: the node is needed (the scheduler splits the graph there) and its input is copied with
 *    ggml_backend_tensor_get (host or device alike) once computed.
 * An input of another type or shape sets `error` and is not captured (Python then leaves capture
 * off). No ggml headers: the field offsets inside struct ggml_tensor are passed in (and checked) from
 * Python.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef bool (*swapmoe_eval_cb)(void *tensor, bool ask, void *user_data);
typedef void (*swapmoe_tensor_get)(const void *tensor, void *data, size_t offset, size_t size);

#define MAX_DEV 8

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
    float *buf;              /* host capture area [n_slots, n_rows, slot_tokens, n_embd] */
    int64_t n_embd;
    int64_t slot_tokens;     /* tokens one step may capture per layer */
    int32_t *n_tok;          /* [n_slots, n_rows] tokens captured in (slot, row), 0: none */
    int32_t error;
    int64_t copy_ns;         /* time spent copying, summed */
    int32_t n_rows;
    int32_t slot;            /* the step slot of this decode call */
    int8_t *where;           /* [n_slots, n_rows]: 0 host area, 1 + d device area d */
    /* redirect */
    int32_t redirect;
    size_t buffer_offset, op_offset, view_src_offset, view_offs_offset, data_offset;
    bool (*buffer_is_host)(void *buffer);
    void *(*buffer_get_type)(void *buffer);
    void *host_buffer;       /* a CPU backend buffer over `buf` */
    int32_t n_dev;
    void *dev_type[MAX_DEV];   /* buffer type of each device area */
    void *dev_buffer[MAX_DEV]; /* its buffer */
    char *dev_base[MAX_DEV];   /* its base address (same layout as `buf`) */
    void *missing_type;        /* a device buffer type asked for and not registered (Python adds it) */
    int32_t max_moved, n_moved;
    void **moved;              /* [max_moved, 3]: tensor, its data, its buffer before the redirect */
    int32_t max_views, n_views;
    void **views;              /* view nodes asked about since the last restore */
    int64_t redirected;        /* inputs redirected, summed */
    int32_t views_full;        /* the view list overflowed: no new redirect until restore */
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

#define FIELD(t, off, type) (*(type *)((char *)(t) + (off)))

/* Remember a tensor's data and buffer, then point it at `data` in `buffer`. */
static bool move_tensor(struct swapmoe_filter *f, void *t, char *data, void *buffer) {
    if (f->n_moved >= f->max_moved) {
        return false;
    }
    void **m = f->moved + 3 * f->n_moved++;
    m[0] = t;
    m[1] = FIELD(t, f->data_offset, void *);
    m[2] = FIELD(t, f->buffer_offset, void *);
    FIELD(t, f->data_offset, char *) = data;
    FIELD(t, f->buffer_offset, void *) = buffer;
    return true;
}

static bool is_moved(const struct swapmoe_filter *f, const void *t) {
    for (int32_t i = f->n_moved - 1; i >= 0; i--) {
        if (f->moved[3 * i] == t) {
            return true;
        }
    }
    return false;
}

/* A view asked about: follow its source if that was redirected; remember it for later redirects. */
static void track_view(struct swapmoe_filter *f, void *t) {
    void *vs = FIELD(t, f->view_src_offset, void *);
    if (vs == NULL) {
        return;
    }
    if (f->n_moved && is_moved(f, vs)) {
        if (!move_tensor(f, t, FIELD(vs, f->data_offset, char *) + FIELD(t, f->view_offs_offset, size_t),
                         FIELD(vs, f->buffer_offset, void *))) {
            f->error = 1;
        }
    } else if (f->n_views < f->max_views) {
        f->views[f->n_views++] = t;
    } else {
        f->views_full = 1; /* views no longer all known: copy from now on (until restore) */
    }
}

/* Point `x` (and its views asked about so far) at `dst`. False: not safe here, copy instead. */
static bool redirect(struct swapmoe_filter *f, char *x, size_t off, int8_t *where) {
    void *buffer = FIELD(x, f->buffer_offset, void *), *target = NULL;
    char *base = NULL;
    if (!f->redirect || f->views_full || buffer == NULL || FIELD(x, f->view_src_offset, void *) != NULL
        || FIELD(x, f->op_offset, int32_t) == 0 /* GGML_OP_NONE: an input */
        || strchr(x + f->name_offset, '#') != NULL /* the scheduler's copy of another split's tensor */) {
        return false;
    }
    if (f->buffer_is_host(buffer)) {
        target = f->host_buffer;
        base = (char *)f->buf;
        *where = 0;
    } else {
        void *type = f->buffer_get_type(buffer);
        for (int32_t d = 0; d < f->n_dev && base == NULL; d++) {
            if (f->dev_type[d] == type) {
                target = f->dev_buffer[d];
                base = f->dev_base[d];
                *where = (int8_t)(1 + d);
            }
        }
        if (base == NULL) {
            f->missing_type = type;
            return false;
        }
    }
    if (target == NULL || f->n_moved + 1 + f->n_views + 64 > f->max_moved) { /* (room for its later views) */
        return false;
    }
    move_tensor(f, x, base + off, target);
    for (int32_t i = 0; i < f->n_views; i++) { /* views asked before the router: nothing computed yet */
        void *v = f->views[i];
        if (FIELD(v, f->view_src_offset, void *) == x) {
            move_tensor(f, v, base + off + FIELD(v, f->view_offs_offset, size_t), target);
        }
    }
    f->redirected++;
    return true;
}

static bool capture(struct swapmoe_filter *f, char *tensor, const char *name, bool ask) {
    int il = parse_layer(name + f->cap_prefix_len);
    int row = (il >= 0 && il < f->n_layer_map) ? f->row_of_layer[il] : -1;
    if (row < 0 || (ask && !f->want[row])) {
        return !ask;
    }
    char *src = *(char **)(tensor + f->src_offset + sizeof(void *)); /* src[1] */
    const int64_t *ne = (const int64_t *)(src + f->ne_offset);
    const size_t *nb = (const size_t *)(src + f->nb_offset);
    int64_t n = ne[1] * ne[2] * ne[3];
    size_t cell = (size_t)f->slot * f->n_rows + row;
    if (*(const int32_t *)(src + f->type_offset) != 0 /* GGML_TYPE_F32 */ || ne[0] != f->n_embd
        || n > f->slot_tokens || nb[0] != sizeof(float) || nb[1] != (size_t)ne[0] * sizeof(float)
        || nb[2] != nb[1] * (size_t)ne[1] || nb[3] != nb[2] * (size_t)ne[2]) {
        f->error = 1;
        return !ask;
    }
    size_t off = cell * (size_t)f->slot_tokens * (size_t)f->n_embd * sizeof(float);
    if (ask) {
        if (redirect(f, src, off, &f->where[cell])) {
            f->n_tok[cell] = (int32_t)n;
            return false; /* computed in place, with the rest of the split */
        }
        return true; /* copy once computed */
    }
    int64_t t0 = now_ns();
    f->tensor_get(src, (char *)f->buf + off, 0, (size_t)(n * f->n_embd) * sizeof(float));
    f->copy_ns += now_ns() - t0;
    f->where[cell] = 0;
    f->n_tok[cell] = (int32_t)n;
    return true;
}

/* After the decode: every redirected tensor back where the allocator put it. */
void swapmoe_filter_restore(struct swapmoe_filter *f) {
    for (int32_t i = f->n_moved - 1; i >= 0; i--) {
        void **m = f->moved + 3 * i;
        FIELD(m[0], f->data_offset, void *) = m[1];
        FIELD(m[0], f->buffer_offset, void *) = m[2];
    }
    f->n_moved = f->n_views = f->views_full = 0;
}

bool swapmoe_filter_eval(void *tensor, bool ask, void *user_data) {
    struct swapmoe_filter *f = (struct swapmoe_filter *)user_data;
    const char *name = (const char *)tensor + f->name_offset;
    if (f->capture) {
        if (strncmp(name, f->cap_prefix, f->cap_prefix_len) == 0) {
            return capture(f, (char *)tensor, name, ask);
        }
        if (ask && (f->redirect || f->n_moved)) {
            track_view(f, tensor);
        }
    }
    if (strncmp(name, f->prefix, f->prefix_len) != 0) {
        return !ask; /* not asked for; when not asking, returning true means "keep computing" */
    }
    return f->forward(tensor, ask, f->forward_ud);
}
