"""The application on top: the `blockdistill` command line, its options, the trainer and
its hooks, checkpoints, metrics writers, plots, the teacher cache on disk, the memory
planner and the block-search command."""
