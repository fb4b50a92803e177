"""A compact batch-1 decode engine (gpt-fast style) with dense and sparse linear layers."""
