"""The runtime: the [`Synchronizer`] (the round loop and the only writer of its state), what a sync checks and how
it runs (one path chosen at construction), and the averaged view for evaluations and checkpoints."""
