// Small kernels that show what emu_runtime.h catches (tests/test_cuda_emu_runtime.py builds and runs this
// program in a subprocess). A failure the emulator records (dk_emu_take_error) makes it exit with 1
// after printing the message to stderr; "no failure" on stdout means the launch went through.
//   emu_selftest broadcast <with_barrier 0|1> <seed>: a block-wide sum broadcast from thread 0
//     through shared memory; prints the number of threads that read a wrong total. Without the
//     __syncthreads() between thread 0's write and the other threads' read this is a race that
//     the fixed thread order 0, 1, 2, ... (seed 0) hides: thread 0 always writes first.
//   emu_selftest exited <seed>: lanes 16..31 of each warp return, then the rest shuffle with the
//     full mask (undefined on a GPU); the emulator must fail the launch.
//   emu_selftest outside <seed>: a shuffle with mask 0x0000ffff reads lane 16; must fail.
//   emu_selftest blocks <seed>: block b adds 1 to what block b - 1 wrote in the same launch (a
//     cross-CTA dependency with no launch boundary, the mistake a split-row phase could make);
//     prints the number of blocks that read a value their predecessor had not written yet. The
//     fixed block order 0, 1, 2, ... (seed 0) hides it.
//   emu_selftest spin <seed>: the shape of a bug that once hung the test suite: thread 5 walks groups
//     of equal values and one index is -1 (a padding entry), whose value is a NaN; the group loop
//     never advances, the fiber never reaches a barrier, and only the launch watchdog
//     ($DK_EMU_LAUNCH_TIMEOUT) ends it, with a failure; then a broadcast launch (with its barrier)
//     runs in the same process and prints "after: wrong N" (the emulator goes on after a failure).
//   emu_selftest overrun <seed>: 64 threads index a 48-entry __shared__ array by thread; built with
//     the emulator's UBSan index checks in trap mode (emu.sanitize_flags()) this fails the launch
//     with "an index out of bounds" and the kernel's name.
//   emu_selftest guard <seed> <index> <at_end>: each of 64 threads writes its slot of a 64-float
//     buffer at index + thread (a fenced buffer, dkemu::Guarded, as the drivers allocate workspaces
//     and emu.py copies tensors), placed against its guard page after it (at_end 1) or before it
//     (0); index 0 is in bounds, index 1 writes one float past the end, index -1 one before the
//     start. A write into the guard page faults and fails the launch, naming the buffer and the
//     byte; a write into the slack on the other side fails the buffer's check(), naming the bytes.
//   emu_selftest read <seed> <index> <at_end>: the same with reads (thread t copies buffer[index +
//     t] to out[t]); prints "nan N", the number of reads that gave a NaN: a read of the slack gives
//     the poison pattern (NaN as a float), a read of the guard page fails the launch.
//   emu_selftest stack <seed>: thread 3 of 64 recurses through 4 KiB frames past its 256 KiB stack;
//     the guard page below the stack faults and the launch fails naming the thread (before, it
//     wrote over the next fiber's stack or the heap); then a broadcast launch runs and prints
//     "after: wrong N".
//   emu_selftest unwritten <seed> <poison 0|1>: 8 blocks of 256 threads; thread t writes part[t]
//     only for t < 128, then every thread reads part[255 - t]; prints "nan N", the reads that gave
//     a NaN. With poison 1 the array is registered as the libraries' __shared__ variables are
//     (dk_emu_set_shared; emu.py finds those in the symbol table) and starts every block as the
//     poison pattern: the 1024 reads of never-written entries give NaN; unregistered, they give
//     the static's zeros and pass unnoticed.
//   emu_selftest lanes <with_syncwarp 0|1> <seed>: each lane of 2 warps writes its slot of a
//     __shared__ array, the warp shuffles (a value of its own), and each lane reads its neighbour's
//     slot; prints "wrong N". The shuffle is a meeting point in the emulator, so every order gives
//     the right values; on a GPU a shuffle does not order memory and only the __syncwarp() makes
//     the read safe. Built with ThreadSanitizer (-DDK_EMU_TSAN=1 -fsanitize=thread) the run
//     without it reports a data race under every seed; with it, none.
//   emu_selftest count <atomic 0|1> <seed>: 256 threads add 1 to one of 8 __shared__ counters,
//     then __syncthreads and thread t reads counter t % 8; prints "wrong N". Fibers never
//     interleave inside the plain `+= 1` either, so every order counts right; built with
//     ThreadSanitizer the plain add is reported as a race and atomicAdd is not.
//   emu_selftest total <atomic 0|1> <seed>: thread 0 of each of 8 blocks adds 1 to one global
//     counter; prints "wrong N" (1 when the count is not 8). The emulator runs one block at a
//     time, so every block order counts right; on a GPU the blocks run at once and the plain add
//     loses updates. Built with ThreadSanitizer (blocks on different fiber sets are unordered)
//     the plain add is reported as a race between blocks, atomicAdd is not.
#include "emu_runtime.h"

#include <cmath>
#include <string>

constexpr unsigned kN = 256, kBlocks = 8;

struct Args {
  int with_barrier;
  float* out;
  unsigned* count = nullptr;
};

// broadcast_kernel's __shared__ variables (file scope: main registers them, as emu.py registers the
// libraries'; unregistered, the ThreadSanitizer build would see the blocks' copies as one)
static float part[kN];
static float total;
static void broadcast_kernel(Args a) {
  const unsigned t = threadIdx.x;
  part[t] = float(blockIdx.x * kN + t);
  __syncthreads();
  if (t == 0) {
    float s = 0.f;
    for (unsigned j = 0; j < kN; ++j) s += part[j];
    total = s;
  }
  if (a.with_barrier) __syncthreads();  // the barrier under test
  a.out[blockIdx.x * kN + t] = total;
  __syncthreads();  // nobody overwrites `total` (next block) before everyone read it
}

static float g_part[kN];  // unwritten_kernel's __shared__ array (file scope: registered by hand)
static void unwritten_kernel(Args a) {
  const unsigned t = threadIdx.x;
  if (t < kN / 2) g_part[t] = 1.f;
  __syncthreads();
  a.out[blockIdx.x * kN + t] = g_part[kN - 1 - t];
  __syncthreads();
}

static void blocks_kernel(Args a) {
  if (threadIdx.x == 0) a.out[blockIdx.x] = (blockIdx.x == 0 ? 0.f : a.out[blockIdx.x - 1]) + 1.f;
}

static void lanes_kernel(Args a) {
  __shared__ float slot[64];
  const unsigned t = threadIdx.x;
  slot[t] = float(t);
  const float own = __shfl_sync(0xffffffffu, float(t), int(t & 31u));
  if (a.with_barrier) __syncwarp();  // the fence under test
  a.out[t] = slot[t ^ 1u] + (own - float(t));
}

static void count_kernel(Args a) {
  __shared__ unsigned counter[8];
  const unsigned t = threadIdx.x;
  if (t < 8) counter[t] = 0;
  __syncthreads();
  if (a.with_barrier)  // here: atomic or not
    atomicAdd(&counter[t % 8], 1u);
  else
    counter[t % 8] += 1;
  __syncthreads();
  a.out[t] = float(counter[t % 8]);
  __syncthreads();
}

static void total_kernel(Args a) {
  if (threadIdx.x != 0) return;
  if (a.with_barrier)  // here: atomic or not
    atomicAdd(a.count, 1u);
  else
    *a.count += 1;
}

static void exited_kernel(Args a) {
  const unsigned t = threadIdx.x;
  if ((t & 31u) >= 16u) return;
  a.out[t] = __shfl_down_sync(0xffffffffu, float(t), 1);
}

static void spin_kernel(Args a) {
  __shared__ float vals[9];
  __shared__ int ord[8];
  const unsigned t = threadIdx.x;
  if (t < 8) ord[t] = t == 6 ? -1 : int(t);          // ord[6]: the padding entry
  if (t < 9) vals[t] = t == 0 ? NAN : float(t / 2);  // vals[ord + 1]: vals[0] is what index -1 reads
  __syncthreads();
  if (t == 5) {
    int groups = 0;
    for (int g = 0; g < 8;) {  // each group: the run of entries equal to its first
      const float gv = vals[ord[g] + 1];
      int q = g;
      while (q < 8 && vals[ord[q] + 1] == gv) ++q;  // a NaN equals nothing, itself included
      ++groups;
      g = q;
    }
    a.out[0] = float(groups);
  }
  __syncthreads();
}

static void overrun_kernel(Args a) {
  __shared__ float part[48];
  const unsigned t = threadIdx.x;
  part[t] = float(t);  // threads 48..63 write past the array
  __syncthreads();
  a.out[t] = part[(t + 1) % 48];
}

static int deep(int n) {
  volatile char frame[4096];
  frame[0] = char(n);
  return n == 0 ? frame[0] : deep(n - 1) + frame[0];
}
static void stack_kernel(Args a) {
  if (threadIdx.x == 3) a.out[0] = float(deep(100));  // ~400 KiB of frames
}

struct GuardArgs {
  float* buf;
  int index;
  float* out;
};
static void guard_kernel(GuardArgs a) { a.buf[a.index + int(threadIdx.x)] = 1.f; }
static void read_kernel(GuardArgs a) { a.out[threadIdx.x] = a.buf[a.index + int(threadIdx.x)]; }

static void outside_kernel(Args a) {
  const unsigned t = threadIdx.x;
  if ((t & 31u) >= 16u) return;
  a.out[t] = __shfl_down_sync(0x0000ffffu, float(t), 1);
}

// The number of broadcast_kernel outputs that differ from their block's sum.
static int broadcast_wrong(const std::vector<float>& out) {
  int wrong = 0;
  for (unsigned b = 0; b < kBlocks; ++b) {
    float s = 0.f;
    for (unsigned j = 0; j < kN; ++j) s += float(b * kN + j);
    for (unsigned t = 0; t < kN; ++t) wrong += out[b * kN + t] != s;
  }
  return wrong;
}

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string mode = argv[1];
  std::vector<float> out(kN * kBlocks, -1.f);
  Args a{0, out.data()};
  const uint64_t shared[4] = {reinterpret_cast<uint64_t>(part), sizeof part, reinterpret_cast<uint64_t>(&total),
                              sizeof total};
  dk_emu_set_shared(shared, 2);
  if (mode == "broadcast") {
    if (argc < 4) return 2;
    a.with_barrier = std::atoi(argv[2]);
    dk_emu_set_schedule_seed(std::atoll(argv[3]));
    dkemu::launch(kBlocks, kN, broadcast_kernel, a);
    std::printf("wrong %d\n", broadcast_wrong(out));
    return 0;
  }
  if (mode == "lanes" || mode == "count") {
    if (argc < 4) return 2;
    a.with_barrier = std::atoi(argv[2]);
    dk_emu_set_schedule_seed(std::atoll(argv[3]));
    const unsigned n = mode == "lanes" ? 64 : kN;
    dkemu::launch(1, n, mode == "lanes" ? lanes_kernel : count_kernel, a);
    int wrong = 0;
    for (unsigned t = 0; t < n; ++t) wrong += out[t] != (mode == "lanes" ? float(t ^ 1u) : float(kN / 8));
    std::printf("wrong %d\n", wrong);
    return dk_emu_take_error() ? 1 : 0;
  }
  if (mode == "total") {
    if (argc < 4) return 2;
    unsigned count = 0;
    a.with_barrier = std::atoi(argv[2]);
    a.count = &count;
    dk_emu_set_schedule_seed(std::atoll(argv[3]));
    dkemu::launch(kBlocks, 32, total_kernel, a);
    std::printf("wrong %d\n", int(count != kBlocks));
    return dk_emu_take_error() ? 1 : 0;
  }
  dk_emu_set_schedule_seed(std::atoll(argv[2]));
  if (mode == "blocks") {
    dkemu::launch(kBlocks, 32, blocks_kernel, a);
    int wrong = 0;
    for (unsigned b = 0; b < kBlocks; ++b) wrong += out[b] != float(b + 1);
    std::printf("wrong %d\n", wrong);
    return 0;
  }
  if (mode == "unwritten") {
    if (argc < 4) return 2;
    const uint64_t part[2] = {reinterpret_cast<uint64_t>(g_part), sizeof g_part};
    if (std::atoi(argv[3])) dk_emu_set_shared(part, 1);
    dkemu::launch(kBlocks, kN, unwritten_kernel, a);
    int nan = 0;
    for (float v : out) nan += std::isnan(v);
    std::printf("nan %d\n", nan);
    return 0;
  }
  if (mode == "exited") dkemu::launch(1, 64, exited_kernel, a);
  if (mode == "outside") dkemu::launch(1, 64, outside_kernel, a);
  if (mode == "overrun") dkemu::launch(1, 64, overrun_kernel, a);
  if (mode == "spin" || mode == "stack") {  // a failing launch, then a correct one in the same process
    dkemu::launch(1, 64, mode == "spin" ? spin_kernel : stack_kernel, a);
    const bool failed = dk_emu_take_error() != nullptr;
    a.with_barrier = 1;
    dkemu::launch(kBlocks, kN, broadcast_kernel, a);
    std::printf("after: wrong %d\n", broadcast_wrong(out));
    return failed || dk_emu_take_error() ? 1 : 0;
  }
  const bool inner = mode == "inner_guard" || mode == "inner_read";
  if (mode == "guard" || mode == "read" || inner) {
    // guard / read: a 64-float buffer against the guard page after it (argv[4] != 0) or before it,
    // 64 threads; inner_*: a workspace of two 32-float regions, each followed by a 64-byte red zone
    // (a layout built with DK_WS_REDZONE = 64: region A at bytes 0..127, B at 192..319), 32 threads.
    // Thread t writes (guard) or reads buffer[index + t].
    if (argc < (inner ? 4 : 5)) return 2;
    const float zero = 0.f;
    const unsigned n = inner ? 32 : 64;
    dkemu::Guarded buf(inner ? "selftest workspace" : "selftest buffer", inner ? 384 : 64 * sizeof(float), &zero,
                       sizeof(float), 16, !inner && std::atoi(argv[4]) != 0);
    if (inner) buf.fence_gaps({0, 192}, 384, 64);
    const GuardArgs g{buf.data<float>(), std::atoi(argv[3]), out.data()};
    const bool write = mode == "guard" || mode == "inner_guard";
    dkemu::launch(1, n, write ? guard_kernel : read_kernel, g);
    buf.check();
    if (dk_emu_take_error()) return 1;
    int nan = 0;
    for (unsigned t = 0; t < n; ++t) nan += std::isnan(out[t]);
    if (write)
      std::printf("ok\n");
    else
      std::printf("nan %d\n", nan);
    return 0;
  }
  if (dk_emu_take_error()) return 1;
  std::printf("no failure\n");
  return 0;
}
