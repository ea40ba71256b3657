// Unity build of tokenmill's CPU kernels: the torch headers are parsed once, not per file
// (the extension is compiled on first use, so compile time is start-up time).

#include "attention.cpp"
#include "gemm.cpp"
#include "layer_ops.cpp"
#include "sampling.cpp"
#include "family_ops.cpp"
#include "moe.cpp"
#include "lora.cpp"
#include "registration.cpp"
