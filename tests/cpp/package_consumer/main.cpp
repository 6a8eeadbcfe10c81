// Links against the installed library and reaches its argument checks (no GPU needed).
#include <cuflash/flash_attention.h>

#include <cstdio>

int main() {
  const cuflash::FlashAttentionError err =
      cuflash::flash_attention_forward(static_cast<const half*>(nullptr), nullptr, nullptr, nullptr, nullptr, 1, 1, 8,
                                       64, 0.125f, false);
  std::printf("%s: %s\n", cuflash::get_error_string(err), cuflash::get_last_error_message());
  return err == cuflash::FlashAttentionError::NULL_POINTER ? 0 : 1;
}
