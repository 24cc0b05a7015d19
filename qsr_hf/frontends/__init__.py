"""The front ends: the Trainer callback and the Accelerate local optimizer."""
