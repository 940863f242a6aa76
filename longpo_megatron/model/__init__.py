"""The network: layer specs, project core attention, RoPE, and the GPTModel subclass."""
