// The thread-local error message of the eet_* launchers and eet_last_error_message() (see errors.h).

#include "errors.h"

#include <cuda_runtime_api.h>

#include <string>

#include "eet_attention.h"

namespace eet {
namespace {

thread_local std::string g_last_error;

}  // namespace

void clear_last_error() noexcept { g_last_error.clear(); }

cudaError_t fail(cudaError_t code, const std::string& message) {
  g_last_error = message;
  return code;
}

cudaError_t invalid(const std::string& message) { return fail(cudaErrorInvalidValue, message); }

cudaError_t out_of_host_memory() noexcept {
  try {
    g_last_error = "out of host memory";
  } catch (...) {
  }
  return cudaErrorMemoryAllocation;
}

std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

const char* last_error_c_str() noexcept { return g_last_error.c_str(); }

}  // namespace eet

extern "C" const char* eet_last_error_message(void) { return eet::last_error_c_str(); }
