"""Training: config, optimizer, sharding, the jitted step, checkpoints and the loop."""
