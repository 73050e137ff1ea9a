/* Eval-callback filter for llama.cpp's scheduler (ggml_backend_sched_eval_callback).
 *
 * llama.cpp asks the eval callback about EVERY graph node (ask=true) before computing it.
 * Crossing into Python for each node costs ~3 us, a large share of a small model's decode
 * step. This filter answers those questions in C by comparing the node name's prefix, and
 * forwards only the matching nodes to the Python callback. No ggml headers: the name's offset
 * inside struct ggml_tensor is passed in (and checked) from Python.
 */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef bool (*swapmoe_eval_cb)(void *tensor, bool ask, void *user_data);

struct swapmoe_filter {
    size_t name_offset;      /* offsetof(struct ggml_tensor, name) */
    const char *prefix;      /* e.g. "ffn_moe_logits-" */
    size_t prefix_len;
    swapmoe_eval_cb forward; /* the Python callback */
    void *forward_ud;
};

bool swapmoe_filter_eval(void *tensor, bool ask, void *user_data) {
    const struct swapmoe_filter *f = (const struct swapmoe_filter *)user_data;
    const char *name = (const char *)tensor + f->name_offset;
    if (strncmp(name, f->prefix, f->prefix_len) != 0) {
        return !ask; /* not asked for; when not asking, returning true means "keep computing" */
    }
    return f->forward(tensor, ask, f->forward_ud);
}
