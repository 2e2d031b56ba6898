"""The built-in gossip plugin (`swim`): the sans-IO SWIM membership core and its overlay driver."""
