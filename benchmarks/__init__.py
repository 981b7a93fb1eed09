"""`make bench`: training-step speed, compile time, memory, input pipeline, PyTorch comparison."""
