// build_tree (a walk: plain C++, compiled once) and the run-time choice of the speculative table.
#include "cpu/spec_kernels.h"
#include "decodekit/speculative.h"

namespace dk::cpu {

void build_tree_rows(const BuildTreeArgs& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, W = (a.T + 7) / 8;
  for (int64_t b = begin; b < end; ++b) {
    int64_t bad = -1;
    a.err[b] = build_tree_row(a.parents + b * T, T, a.prefix_lens[b], b * T, a.mask + b * T * W, a.positions + b * T,
                              a.retrive_index + b * T, a.next_token + b * T, a.next_sibling + b * T, &bad);
    a.err_node[b] = bad;
  }
}

const SpecTable& spec_active() {
  switch (active_isa_id()) {
#if DK_X86_PATHS
    case 2: return spec_table_avx512();
    case 1: return spec_table_avx2();
#endif
    default: return spec_table_scalar();
  }
}

}  // namespace dk::cpu
