"""The built-in model: llama.cpp's server started, checked and stopped around a run."""
