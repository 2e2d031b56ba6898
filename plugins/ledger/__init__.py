"""The built-in ledger plugin (`chains`): signed per-author chains (`ops`), kind rules (`rules`),
the deterministic fold (`fold`), storage (`store`), verification (`verify`), and the node plugin
that replicates and settles them (`chains`)."""
