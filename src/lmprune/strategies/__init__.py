"""Block strategies: methods that prune a whole decoder block at once (the engine calls ``prune_block``)."""
