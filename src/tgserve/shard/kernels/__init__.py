"""The C++ CPU kernels: sources (csrc/), their build (build.py), one wrapper module per family."""
