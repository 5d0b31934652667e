#include "neuralink/row_gemm.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <stdexcept>
#include <string>

namespace neuralink {

bool gemm_stride_ok(const WeightType & wt, int64_t n_embd, size_t stride) {
    const size_t block = ggml_type_size(wt.type);
    return stride >= wt.row_bytes(n_embd) && stride % block == 0;
}

namespace {

// the product's graph over tensor headers only; the caller sets the data pointers and frees ctx
ggml_cgraph * product_graph(ggml_context ** ctx, const WeightType & wt, int64_t n_rows, int64_t n_embd,
                            int64_t n_tokens, ggml_tensor ** a, ggml_tensor ** b, ggml_tensor ** c) {
    ggml_init_params params {};
    params.mem_size = 4 * ggml_tensor_overhead() + ggml_graph_overhead_custom(4, false);
    params.no_alloc = true;
    *ctx = ggml_init(params);
    if (!*ctx) {
        throw std::runtime_error("ggml_init failed for a batched FFN product");
    }
    *a = ggml_new_tensor_2d(*ctx, wt.type, n_embd, n_rows);
    // activations in the vec_dot type are taken as they are (ggml would otherwise quantize them on every call)
    *b = ggml_new_tensor_2d(*ctx, wt.vec_dot_type, n_embd, n_tokens);
    *c = ggml_mul_mat(*ctx, *a, *b); // ne0 = n_rows, ne1 = n_tokens
    ggml_cgraph * graph = ggml_new_graph_custom(*ctx, 4, false);
    ggml_build_forward_expand(graph, *c);
    return graph;
}

} // namespace

size_t rows_times_tokens_work_bytes(const WeightType & wt, int64_t n_rows, int64_t n_embd, int64_t n_tokens) {
    ggml_context * ctx = nullptr;
    ggml_tensor *a, *b, *c;
    ggml_cgraph * graph = product_graph(&ctx, wt, n_rows, n_embd, n_tokens, &a, &b, &c);
    const size_t bytes = ggml_graph_plan(graph, 1, nullptr).work_size;
    ggml_free(ctx);
    return bytes;
}

void rows_times_tokens(const WeightType & wt, const uint8_t * rows, size_t stride, int64_t n_rows, int64_t n_embd,
                       const uint8_t * xq, int64_t n_tokens, float * out, int64_t out_stride, std::vector<uint8_t> & work) {
    if (n_rows <= 0 || n_tokens <= 0) {
        return;
    }
    // tensor headers and a three-node graph only: the data stays where it is
    ggml_context * ctx = nullptr;
    ggml_tensor *a, *b, *c;
    ggml_cgraph * graph = product_graph(&ctx, wt, n_rows, n_embd, n_tokens, &a, &b, &c);
    a->nb[1] = stride;
    a->nb[2] = a->nb[3] = stride * (size_t) n_rows;
    a->data = const_cast<uint8_t *>(rows);
    b->data = const_cast<uint8_t *>(xq);
    c->nb[1] = sizeof(float) * (size_t) out_stride;
    c->nb[2] = c->nb[3] = c->nb[1] * (size_t) n_tokens;
    c->data = out;
    // one thread: the caller is one of llama.cpp's compute threads, with its own share of the rows
    ggml_cplan plan = ggml_graph_plan(graph, 1, nullptr);
    if (work.size() < plan.work_size) work.resize(plan.work_size);
    plan.work_data = work.data();
    const ggml_status status = ggml_graph_compute(graph, &plan);
    ggml_free(ctx);
    if (status != GGML_STATUS_SUCCESS) {
        throw std::runtime_error("ggml's mul_mat failed for a batched FFN product (status " +
                                 std::to_string((int) status) + ")");
    }
}

} // namespace neuralink
