"""Forward-step contract, the CPU pipeline schedule, and the CPU / Megatron training engines."""
