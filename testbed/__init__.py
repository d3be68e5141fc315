"""The emulator and the control plane: topologies become Mininet networks, the driver runs
scenarios on them, the controller plans, deploys and feeds the pipeline."""
