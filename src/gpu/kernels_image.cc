// The fatbin that nvcc built from kernels.cu (SHARDPS_KERNELS_FATBIN, a path the build sets),
// carried in the library's read-only data: device.cc hands it to the CUDA runtime.
#ifndef SHARDPS_KERNELS_FATBIN
#error "SHARDPS_KERNELS_FATBIN: the build sets the fatbin's path"
#endif

__asm__(
    ".section .rodata\n"
    ".balign 64\n"
    ".globl shardps_kernels_fatbin\n"
    ".hidden shardps_kernels_fatbin\n"
    ".type shardps_kernels_fatbin, @object\n"
    "shardps_kernels_fatbin:\n"
    ".incbin \"" SHARDPS_KERNELS_FATBIN
    "\"\n"
    ".previous\n");
