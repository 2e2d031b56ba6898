"""A node's place in the network: its identity, the genesis, signed receipts, the canonical encoding
everything is signed over, and the wiring of the network plugins (`wiring`)."""
