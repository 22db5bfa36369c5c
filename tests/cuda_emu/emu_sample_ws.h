// The red zones of sampling.cuh's split workspace (sample_layout; DK_WS_REDZONE bytes after every
// region) in the emulator's fenced buffer: shared by the sampling and speculative drivers.
#pragma once
#include <vector>
#include "emu_runtime.h"
#include "cuda/sampling.cuh"

namespace dkemu {
inline void fence_sample_ws(Guarded& ws, dk::cuda::SplitArgs sa) {
  const int64_t elems = dk::cuda::detail::sample_layout(sa, ws.data<double>());
  const auto* base = ws.data<unsigned char>();
  const auto& w = sa.ws;
  const void* regions[] = {w.kmass, w.parts, w.zmass, w.khist, w.phist, w.rows, w.lcount, w.lidx, w.lw};
  std::vector<size_t> starts;
  for (const void* r : regions)
    if (r) starts.push_back(size_t(static_cast<const unsigned char*>(r) - base));
  ws.fence_gaps(starts, size_t(elems) * sizeof(double), DK_WS_REDZONE);
}
}  // namespace dkemu
