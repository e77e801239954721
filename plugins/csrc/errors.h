// Host-side error reporting shared by every eet_* launcher: one thread-local message, read through
// eet_last_error_message() (eet_attention.h).
//
// A launcher clears the message on entry (clear_last_error) and, when it fails, returns through fail /
// invalid (which set it) or, from its catch (...) block, out_of_host_memory. No exception may cross the
// C ABI: fail and invalid build std::strings and may throw std::bad_alloc, which the launcher catches.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

namespace eet {

// Resets this thread's message to "".
void clear_last_error() noexcept;

// Sets this thread's message and returns code.
cudaError_t fail(cudaError_t code, const std::string& message);

// fail(cudaErrorInvalidValue, message).
cudaError_t invalid(const std::string& message);

// Sets the message to "out of host memory" if that is possible and returns cudaErrorMemoryAllocation.
cudaError_t out_of_host_memory() noexcept;

// "cudaErrorX (description)".
std::string cuda_error_text(cudaError_t err);

// This thread's message (valid until the next launcher call on this thread).
const char* last_error_c_str() noexcept;

}  // namespace eet
