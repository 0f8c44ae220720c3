"""hotsup's supervisor: owns the sockets, the zygote, the swaps and the control plane."""
